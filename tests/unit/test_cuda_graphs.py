"""Decode graphs' pieces without a model (worker/cuda_graphs.py): the ladder of sizes, the persistent
buffers a step is copied into (padding rows in the scratch block), the CPU capture stand-in that
refuses host syncs, torch_ref's capturable decode group against its eager groups, and when graphs apply."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.torch_ref import TorchAttentionBackend
from kvserve.config import CompilationConfig
from kvserve.worker.cuda_graphs import DecodeBuffers, capture_sizes, eager_capture, graph_capture_for

BS, MAX_LEN, SCRATCH = 4, 20, 9  # W = 5 table entries; blocks 0..8 belong to the pool, 9 is scratch


def test_ladder_of_sizes_ends_at_max_num_seqs_or_the_cap():
    assert capture_sizes(256, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(48, 256) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_sizes(1000, 256)[-1] == 256 and capture_sizes(5, 8) == [1, 2, 4, 5]
    assert capture_sizes(1, 256) == [1] and capture_sizes(16, 0) == []


def test_fill_writes_live_rows_and_padding_into_the_scratch_block():
    buffers = DecodeBuffers(8, BS, MAX_LEN, SCRATCH, "cpu")
    meta = buffers.metadata(4)  # views: what the size-4 graph reads
    # Three decodes: contexts 5, 1 and 12 tokens (this step's token is the last of each).
    buffers.fill([11, 12, 13], [5, 1, 12], [[3, 7], [0], [1, 2, 8]], size=4)
    assert meta.seq_lens.tolist() == [5, 1, 12, 1]
    assert meta.positions.tolist() == [4, 0, 11, 0] and buffers.input_ids[:4].tolist() == [11, 12, 13, 0]
    # Position p of a request sits in table[p // 4] at offset p % 4; the padding row in scratch slot 0.
    assert meta.slot_mapping.tolist() == [7 * BS + 0, 0 * BS + 0, 8 * BS + 3, SCRATCH * BS]
    assert meta.block_tables.tolist() == [[3, 7, 9, 9, 9], [0, 9, 9, 9, 9], [1, 2, 8, 9, 9], [9] * 5]
    # The next, smaller step at size 4: the row that was live is padding again, nothing left over.
    buffers.fill([21, 22], [6, 2], [[3, 7], [0]], size=4)
    assert meta.block_tables.tolist() == [[3, 7, 9, 9, 9], [0, 9, 9, 9, 9], [9] * 5, [9] * 5]
    assert meta.slot_mapping.tolist() == [7 * BS + 1, 1, SCRATCH * BS, SCRATCH * BS]
    assert meta.seq_lens.tolist() == [6, 2, 1, 1] and buffers.input_ids[:4].tolist() == [21, 22, 0, 0]
    # The host copies keep their capture-time (all padding) values; query starts are fixed.
    assert meta.seq_lens_host == [1] * 4 and meta.query_lens == [1] * 4 and meta.graph_max_seq_len == MAX_LEN
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4] and meta.query_start_loc_host.tolist() == [0, 1, 2, 3, 4]


def test_eager_capture_refuses_host_syncs_and_replays_into_the_captured_output():
    x = torch.arange(4.0)
    for syncing in (lambda: x * x.sum().item(), lambda: x[x > 1], lambda: x.nonzero().float()):
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
            eager_capture(syncing)
    replay = eager_capture(lambda: x * 2)
    out = replay()
    x.copy_(torch.tensor([5.0, 6.0, 7.0, 8.0]))  # the persistent input changes between replays
    again = replay()
    assert again is out and again.tolist() == [10.0, 12.0, 14.0, 16.0]


def test_torch_ref_decode_graph_group_matches_its_eager_groups_and_captures():
    """The same decode step (contexts 5, 1, 12; GQA 4:2) through torch_ref's eager groups and through
    its decode graph group over the persistent buffers, at size 4 (one padding row): the same
    outputs for the live rows, the same slots written; the padding row wrote only the scratch block.
    The eager groups cannot be captured (their planning reads values on the host); the graph's can."""
    torch.manual_seed(0)
    hq, hkv, d, seq_lens, tables = 4, 2, 8, [5, 1, 12], [[3, 7], [0], [1, 2, 8]]
    q, k, v = torch.randn(4, hq, d), torch.randn(4, hkv, d), torch.randn(4, hkv, d)
    cache = torch.randn(2, SCRATCH + 1, BS, hkv, d)  # finite everywhere, as torch_ref needs
    backend = TorchAttentionBackend()

    eager_meta = build_attention_metadata([1, 1, 1], seq_lens, tables, BS)
    eager_cache = cache.clone()
    backend.prepare(eager_meta)
    expected = backend.forward(q[:3], k[:3], v[:3], eager_cache, eager_meta, d**-0.5)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        eager_capture(lambda: backend.prepare(eager_meta))

    buffers = DecodeBuffers(8, BS, MAX_LEN, SCRATCH, "cpu")
    meta = buffers.metadata(4)
    buffers.fill([0, 0, 0], seq_lens, tables, size=4)
    graph_cache = cache.clone()

    def step():
        backend.prepare(meta)
        return backend.forward(q, k, v, graph_cache, meta, d**-0.5)

    out = eager_capture(step)()  # capture writes the same slots again: the replay's result is the same
    torch.testing.assert_close(out[:3], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(graph_cache[:, :SCRATCH], eager_cache[:, :SCRATCH], atol=0, rtol=0)
    assert torch.equal(graph_cache[0, SCRATCH, 0], k[3]) and torch.equal(graph_cache[1, SCRATCH, 0], v[3])
    assert torch.equal(graph_cache[:, SCRATCH, 1:], cache[:, SCRATCH, 1:])


def test_graphs_apply_only_on_cuda_without_enforce_eager_and_with_a_graph_safe_backend():
    torch_ref = TorchAttentionBackend()
    assert torch_ref.graph_safe
    on = CompilationConfig()
    assert graph_capture_for(SimpleNamespace(device="cpu", compilation=on), torch_ref) is None
    eager = CompilationConfig(enforce_eager=True)
    assert graph_capture_for(SimpleNamespace(device="cuda", compilation=eager), torch_ref) is None
    unsafe = SimpleNamespace(name="cpu", graph_safe=False)
    assert graph_capture_for(SimpleNamespace(device="cuda", compilation=on), unsafe) is None

