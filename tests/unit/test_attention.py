"""Paged attention backends (torch reference, CPU kernels) against plain causal attention on contiguous K/V."""
import functools
import math

import pytest
import torch

from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.cpu_paged import CpuAttentionBackend
from kvserve.attention.torch_ref import TorchAttentionBackend

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

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


# (backend, dtype, tolerance): bf16 inputs are compared with float32 attention of the same bf16 values.
# The CPU backend computes chunks after context in its kernel up to max_kernel_chunk_work (all of
# this test's), else through the reference's gathers: both routes are checked.
_cpu_context_by_reference = functools.partial(CpuAttentionBackend, max_kernel_chunk_work=0)
BACKENDS = [
    (TorchAttentionBackend, torch.float32, 1e-5),
    (CpuAttentionBackend, torch.float32, 1e-5),
    (CpuAttentionBackend, torch.bfloat16, 1e-2),
    (_cpu_context_by_reference, torch.float32, 1e-5),
    (_cpu_context_by_reference, torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("backend_cls,dtype,tol", BACKENDS)
def test_mixed_prefill_chunks_and_decodes_match_dense_attention(backend_cls, dtype, tol):
    torch.manual_seed(0)
    num_blocks = 40
    # Slots that were never written (or hold stale KV) must not leak into outputs: fill them with
    # large values that would dominate any unmasked score, or NaN where the backend does not ask
    # the runner to zero blocks first.
    backend = backend_cls()
    fill = 50.0 if backend.needs_zeroed_blocks else float("nan")
    cache = torch.full((2, num_blocks, BS, HKV, D), fill, dtype=dtype)
    full_len = [7, 5, 13, 1]
    tables = [[5, 2], [9], [30, 31, 1, 20], [11]]
    ks = [torch.randn(n, HKV, D).to(dtype) for n in full_len]
    vs = [torch.randn(n, HKV, D).to(dtype) for n in full_len]
    qs = [torch.randn(n, HQ, D).to(dtype) for n in full_len]
    # Step 1: fresh prompts: requests 0 and 1 (5 tokens each, adjacent: one batched call), request
    # 2's first chunk of 4; request 3 not yet.
    # Step 2: request 0 decodes one token, request 2 a second chunk after its context.
    # Step 3: request 2 its last chunk, request 3 its only token, request 0 its last token.
    steps = [
        {0: (0, 5), 1: (0, 5), 2: (0, 4)},
        {0: (5, 6), 2: (4, 9)},
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
            [
                dense_attention(qs[r][slice(*step[r])].float(), ks[r][: step[r][1]].float(), vs[r][: step[r][1]].float())
                for r in reqs
            ]
        )
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_slot_mapping_and_positions():
    meta = build_attention_metadata([2, 1], [6, 3], [[7, 3], [4]], BS)
    assert meta.positions.tolist() == [4, 5, 2]
    assert meta.slot_mapping.tolist() == [3 * BS + 0, 3 * BS + 1, 4 * BS + 2]
    assert meta.query_start_loc.tolist() == [0, 2, 3]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
# GQA groups of 3, 8 and 5 query heads (the value update takes 4 rows at a time at D = 64, 2 at
# D = 128), plain multi-head attention, and a head size without a compiled fast path.
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 64), (16, 2, 64), (10, 2, 64), (6, 2, 128), (4, 4, 64), (6, 3, 80)])
def test_cpu_paged_kernel_reads_context_in_place(dtype, tol, hq, hkv, d):
    """The C++ kernel on its own, every row kind (decode, fresh prefill, chunk after context),
    GQA, block size 16, scattered blocks, and NaN in every slot no request has written."""
    from kvserve.ops import cpu_ops

    torch.manual_seed(1)
    bs, num_blocks = 16, 64
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    # Nine requests: batches of 8+ give each work item all kv heads, smaller ones one head each.
    ctx_lens, q_lens = [1, 40, 97, 16, 17, 33, 130, 64, 5], [1, 1, 5, 16, 9, 33, 1, 1, 2]
    free = torch.randperm(num_blocks).tolist()
    tables, qs, ks, vs = [], [], [], []
    for n_ctx in ctx_lens:
        table = [free.pop() for _ in range(-(-n_ctx // bs))]
        k, v = torch.randn(n_ctx, hkv, d).to(dtype), torch.randn(n_ctx, hkv, d).to(dtype)
        for pos in range(n_ctx):
            cache[0, table[pos // bs], pos % bs], cache[1, table[pos // bs], pos % bs] = k[pos], v[pos]
        tables.append(table)
        ks.append(k)
        vs.append(v)
    qs = [torch.randn(n, hq, d).to(dtype) for n in q_lens]
    meta = build_attention_metadata(q_lens, ctx_lens, tables, bs)
    q = torch.cat(qs)
    out = torch.zeros_like(q)
    for reqs in (torch.arange(len(q_lens)), torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5, 6, 7, 8])):
        assert cpu_ops.paged_attention(
            q, cache, out, meta.block_tables_host, torch.tensor(ctx_lens), meta.query_start_loc_host, reqs, d**-0.5
        )
    for b in range(len(q_lens)):
        rows = slice(int(meta.query_start_loc_host[b]), int(meta.query_start_loc_host[b + 1]))
        k, v = ks[b].float().repeat_interleave(hq // hkv, 1), vs[b].float().repeat_interleave(hq // hkv, 1)
        n, m = q_lens[b], ctx_lens[b]
        scores = torch.einsum("qhd,khd->hqk", qs[b].float(), k) * d**-0.5
        allowed = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
        expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        torch.testing.assert_close(out[rows].float(), expected, atol=tol, rtol=tol)
    # Only the listed requests are written.
    out2 = torch.zeros_like(q)
    cpu_ops.paged_attention(
        q, cache, out2, meta.block_tables_host, torch.tensor(ctx_lens), meta.query_start_loc_host,
        torch.tensor([2]), d**-0.5,
    )  # fmt: skip
    assert out2[:2].abs().sum() == 0 and out2[7:].abs().sum() == 0 and out2[2:7].abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "prefix,with_fresh",
    [([41, 7, 63], True), ([20, 21, 22], True), ([20, 21, 22], False)],
    ids=["gathered", "in-place", "in-place-all-rows"],
)
def test_cpu_backend_cascade_over_shared_prefix_matches_reference(dtype, tol, prefix, with_fresh):
    """Ten requests whose tables start with the same three blocks (prefix caching), some decoding,
    some prefilling a chunk after the prefix, with or without one fresh prompt: the cascade (shared
    blocks once for all rows, then each request's own blocks) equals the torch reference. The shared
    blocks are gathered, or read in place where their ids are consecutive."""
    torch.manual_seed(2)
    hq, hkv, d, bs, num_blocks = 6, 2, 64, 16, 80
    cache = torch.randn(2, num_blocks, bs, hkv, d).to(dtype)
    free = [b for b in range(num_blocks) if b not in prefix]  # the prefix: 48 shared tokens
    q_lens = [1, 1, 1, 1, 1, 1, 5, 16, 9, 1, 20][: None if with_fresh else -1]
    seq_lens = [49, 50, 64, 65, 80, 97, 53, 70, 60, 49, 20][: None if with_fresh else -1]  # last: a fresh prompt
    tables = []
    for n_ctx, n_q in zip(seq_lens, q_lens):
        own = -(-n_ctx // bs) - len(prefix)
        tables.append(prefix + [free.pop() for _ in range(own)] if n_ctx > n_q else [free.pop() for _ in range(-(-n_ctx // bs))])
    meta = build_attention_metadata(q_lens, seq_lens, tables, bs)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, h, d).to(dtype) for h in (hq, hkv, hkv))
    ref_cache = cache.clone()
    expected = TorchAttentionBackend().forward(q, k, v, ref_cache, meta, d**-0.5)

    backend = CpuAttentionBackend(min_cascade_tokens=32, min_cascade_requests=4)
    meta2 = build_attention_metadata(q_lens, seq_lens, tables, bs)
    backend.prepare(meta2)
    assert meta2.backend_state.cascade is not None
    cascade = meta2.backend_state.cascade
    assert cascade.prefix_blocks.tolist() == prefix
    assert cascade.prefix_first == (20 if prefix[0] == 20 else None) and cascade.all_rows == (not with_fresh)
    out = backend.forward(q, k, v, cache, meta2, d**-0.5)
    assert torch.equal(cache, ref_cache)  # both wrote the step's k/v to the same slots
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)

    # Without enough sharers, no cascade: same answer through the per-request path.
    meta3 = build_attention_metadata(q_lens, seq_lens, tables, bs)
    CpuAttentionBackend(min_cascade_tokens=32, min_cascade_requests=100).prepare(meta3)
    assert meta3.backend_state.cascade is None


def test_cpu_backend_sends_short_chunks_after_context_to_the_kernel_and_long_ones_to_the_reference():
    """Routing by query rows x keys: a decode and a 4-row chunk after 12 tokens (4 x 16 = 64 <= 100)
    go to the paged kernel, a 10-row chunk after 10 tokens (10 x 20 = 200) to the reference group,
    a fresh prompt to the prefill path."""
    meta = build_attention_metadata([1, 4, 10, 3], [9, 16, 20, 3], [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11], [12]], BS)
    CpuAttentionBackend(max_kernel_chunk_work=100).prepare(meta)
    plan = meta.backend_state
    assert plan.kernel_reqs.tolist() == [0, 1]
    assert plan.context is not None and plan.context.out_rows.tolist() == list(range(5, 15))  # request 2
    assert plan.fresh == [(15, 3, 1)]  # rows 15..17: one chunk of 3
