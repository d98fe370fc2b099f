"""Torch reference paged attention against plain causal attention on contiguous K/V."""
import math

import torch

from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.torch_ref import TorchAttentionBackend

HQ, HKV, D, BS = 4, 2, 8, 4


def dense_attention(q, k, v):
    """q: [n, Hq, D] are the last rows of a causal sequence whose keys/values are k, v: [m, Hkv, D]."""
    k = k.repeat_interleave(HQ // HKV, 1)
    v = v.repeat_interleave(HQ // HKV, 1)
    n, m = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    allowed = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mixed_prefill_chunks_and_decodes_match_dense_attention():
    torch.manual_seed(0)
    num_blocks = 40
    # Slots that were never written (or hold stale KV) must not leak into outputs: fill them with
    # large values that would dominate any unmasked score.
    cache = torch.full((2, num_blocks, BS, HKV, D), 50.0)
    backend = TorchAttentionBackend()
    full_len = [7, 3, 13, 1]
    tables = [[5, 2], [9], [30, 31, 1, 20], [11]]
    ks = [torch.randn(n, HKV, D) for n in full_len]
    vs = [torch.randn(n, HKV, D) for n in full_len]
    qs = [torch.randn(n, HQ, D) for n in full_len]
    # Step 1: request 0 whole, request 1 whole, request 2 first chunk of 5, request 3 not yet.
    # Step 2: request 0 and 1 decode one more token each is simulated by a second chunk of 2.
    # Step 3: request 2 second chunk (8), request 3 its only token, request 0 last token.
    steps = [
        {0: (0, 5), 1: (0, 3), 2: (0, 5)},
        {0: (5, 6), 2: (5, 9)},
        {0: (6, 7), 2: (9, 13), 3: (0, 1)},
    ]
    for step in steps:
        reqs = sorted(step)
        meta = build_attention_metadata(
            [step[r][1] - step[r][0] for r in reqs], [step[r][1] for r in reqs], [tables[r] for r in reqs], BS
        )
        q = torch.cat([qs[r][slice(*step[r])] for r in reqs])
        k = torch.cat([ks[r][slice(*step[r])] for r in reqs])
        v = torch.cat([vs[r][slice(*step[r])] for r in reqs])
        backend.prepare(meta)
        out = backend.forward(q, k, v, cache, meta, 1 / math.sqrt(D))
        expected = torch.cat(
            [dense_attention(qs[r][slice(*step[r])], ks[r][: step[r][1]], vs[r][: step[r][1]]) for r in reqs]
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_slot_mapping_and_positions():
    meta = build_attention_metadata([2, 1], [6, 3], [[7, 3], [4]], BS)
    assert meta.positions.tolist() == [4, 5, 2]
    assert meta.slot_mapping.tolist() == [3 * BS + 0, 3 * BS + 1, 4 * BS + 2]
    assert meta.query_start_loc.tolist() == [0, 2, 3]
