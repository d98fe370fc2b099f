"""Triton kernels of the GPU attention backend (attention/triton_attn.py plans and launches them):
the K/V write into the paged cache, and one unified paged attention kernel over the step's packed
rows (decodes, fresh prompts, chunks after cached context alike), optionally split over the keys
(split-KV) and then reduced. Their reference is attention/torch_ref.py; tests run them under
Triton's interpreter (TRITON_INTERPRET=1, which must be set before triton is imported).

Layouts (as in attention/backend.py and metadata.py):
  q            [T, Hq, D]   row stride free, heads D apart, dims contiguous
  kv_cache     [2, num_blocks, block_size, Hkv, D] contiguous; slot s of keys at s * Hkv * D,
               values v_offset (= kv_cache.stride(0)) further
  block_tables [B, width] int64, query_start_loc [B + 1] int64, seq_lens [B] int64
Query i of request b sits at position seq_lens[b] - query_len[b] + i and sees keys 0 ..= that.

Program grid of the attention kernel: (q-blocks, Hkv, segments). A q-block is BLOCK_Q consecutive
queries of one request times the G = Hq / Hkv query heads that share one kv head: BLOCK_M >= 16 rows
of one tl.dot (row m: query m // G, head kv_head * G + m % G). Request b's q-blocks are numbered from
query_start_loc[b] // BLOCK_Q + b, so T // BLOCK_Q + B programs cover every request with no host
planning (a program past its request's queries exits); a binary search finds each block's request.
Keys are read in place through the block table, TILE keys at a time (a tile may span blocks or part
of one), only up to the block's last query position: a slot past a request's context is never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,  # k, v [T, Hkv, D] (rows stride_k / stride_v apart); slots [T]
    stride_k, stride_v, v_offset,
    ROW: tl.constexpr,  # Hkv * D
    ROW_PAD: tl.constexpr,  # next power of two
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # a negative slot is a padding row: nothing to write
        offs = tl.arange(0, ROW_PAD)
        ok = offs < ROW
        k = tl.load(k_ptr + t.to(tl.int64) * stride_k + offs, mask=ok)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_v + offs, mask=ok)
        tl.store(cache_ptr + slot * ROW + offs, k, mask=ok)
        tl.store(cache_ptr + v_offset + slot * ROW + offs, v, mask=ok)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (each row contiguous) -> slots slot_mapping [T] of kv_cache (contiguous)."""
    t, hkv, d = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t,)](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache.stride(0), **write_constants(hkv, d)
    )


def write_constants(hkv: int, d: int) -> dict:
    return dict(ROW=hkv * d, ROW_PAD=triton.next_power_of_2(hkv * d))


@triton.jit
def _request_of_block(query_start_ptr, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """The last request b whose first q-block number (query_start_loc[b] // BLOCK_Q + b) is <= q_block."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The request and segment counts vary step to step: one compiled kernel for all (a count of 1 would
# otherwise be specialized into a constant and a second kernel).
@triton.jit(do_not_specialize=["num_reqs", "num_segments", "kv_start", "kv_end", "seg_base", "num_parts"])
def _attention_kernel(
    out_ptr,  # [T, Hq, D] contiguous (written when not SPLIT)
    part_out_ptr, part_max_ptr, part_sum_ptr,  # [T, Hq, P, D], [T, Hq, P], [T, Hq, P] float32 (SPLIT)
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    num_reqs, num_segments,
    kv_start, kv_end,  # only keys at positions [kv_start, kv_end) (a cascade's two passes; else 0, huge)
    seg_base, num_parts,  # this launch's segments are parts seg_base .. + num_segments of num_parts
    stride_qt, stride_qh, stride_bt, v_offset,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block, kv_head, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    b = _request_of_block(query_start_ptr, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    q_first = (q_block - (q_start // BLOCK_Q + b)) * BLOCK_Q  # this block's first query in its request
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len  # keys cached before this step

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_t = tl.arange(0, TILE)
    qi = q_first + offs_m // G  # [BLOCK_M] query index within the request
    head = kv_head * G + offs_m % G  # [BLOCK_M]
    row_ok = (offs_m < BLOCK_Q * G) & (qi < q_len)
    dim_ok = offs_d < HEAD
    token = (q_start + qi).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )  # [BLOCK_M, HEAD_PAD]  # fmt: skip

    # Keys this block needs: up to its last query's position (and below kv_end), from kv_start.
    # Segment `seg` of `num_segments` takes an equal run of the request's tiles from kv_start's (the
    # same split for all of the request's q-blocks).
    kv_len = tl.minimum(context + tl.minimum(q_first + BLOCK_Q, q_len), kv_end)
    tile_first = kv_start // TILE
    tiles_per_seg = tl.cdiv(tl.cdiv(tl.minimum(seq_len, kv_end), TILE) - tile_first, num_segments)
    tile_lo = tile_first + seg * tiles_per_seg
    tile_hi = tl.minimum(tile_lo + tiles_per_seg, tl.cdiv(kv_len, TILE))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)  # running sum of exp2(score - m_i) * v
    table = block_tables_ptr + b * stride_bt
    for j in range(tile_lo, tile_hi):
        kpos = j * TILE + offs_t  # [TILE] key positions
        k_ok = (kpos < kv_len) & (kpos >= kv_start)
        block = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0)
        kv = (block * BLOCK_SIZE + kpos % BLOCK_SIZE) * (HKV * HEAD) + kv_head * HEAD  # [TILE] int64
        k_ptrs = cache_ptr + kv[None, :] + offs_d[:, None]  # keys transposed: [HEAD_PAD, TILE]
        k = tl.load(k_ptrs, mask=k_ok[None, :] & dim_ok[:, None], other=0.0)
        v_ptrs = cache_ptr + v_offset + kv[:, None] + offs_d[None, :]
        v = tl.load(v_ptrs, mask=k_ok[:, None] & dim_ok[None, :], other=0.0)  # [TILE, HEAD_PAD]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, TILE]
        seen = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= (context + qi)[:, None])  # causal, in range
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:  # partial results, an empty segment's as (-inf, 0, 0); _reduce_kernel combines them
        part = (token * HQ + head) * num_parts + seg_base + seg  # [BLOCK_M]
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD + offs_d[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
    else:  # every real row saw key 0, so its l_i > 0 (padding rows divide by 1, not 0, and are not stored)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = out_ptr + (token * HQ + head)[:, None] * HEAD + offs_d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["num_segments"])
def _reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,  # out [T * Hq, D]; parts as above
    num_segments,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, SEG_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token * Hq + head
    offs_s = tl.arange(0, SEG_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    seg_ok = offs_s < num_segments
    dim_ok = offs_d < HEAD
    part = row * num_segments + offs_s  # [SEG_PAD]
    m = tl.load(part_max_ptr + part, mask=seg_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=seg_ok, other=0.0)
    acc_ptrs = part_out_ptr + part[:, None] * HEAD + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=seg_ok[:, None] & dim_ok[None, :], other=0.0)  # [SEG_PAD, HEAD_PAD]
    w = tl.exp2(m - tl.max(m, 0))  # [SEG_PAD]; segment 0 holds key 0, so the max is finite
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + row * HEAD + offs_d, o.to(out_ptr.dtype.element_ty), mask=dim_ok)


def attention_constants(
    dtype: torch.dtype, hq: int, hkv: int, d: int, block_size: int, block_m: int, tile: int, split: bool
) -> dict:
    """The attention kernel's compile-time arguments (also what tests compile for GPU targets)."""
    return dict(
        HQ=hq, HKV=hkv, HEAD=d, HEAD_PAD=_head_pad(d), BLOCK_SIZE=block_size, BLOCK_Q=block_m // (hq // hkv),
        BLOCK_M=block_m, TILE=tile, SPLIT=split, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip


def reduce_constants(d: int, segments: int) -> dict:
    return dict(HEAD=d, HEAD_PAD=_head_pad(d), SEG_PAD=triton.next_power_of_2(segments))


def _head_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot takes 16 or more


@dataclass(frozen=True)
class CascadePrefix:
    """A cascade's shared part: the first `length` keys, in the same blocks for every request of the
    step, attended once for all rows as one request of T queries (block table `table` [1, n] int64,
    seq_lens [1] = length + T, query_start [2] = (0, T), device tensors), `block_m` rows per program.
    Every query of the step sits past them, so no mask applies there."""

    length: int
    table: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor
    block_m: int


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D], dims contiguous
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D] contiguous
    out: torch.Tensor,  # [T, Hq, D] contiguous
    block_tables: torch.Tensor,  # [B, width] int64, rows contiguous
    seq_lens: torch.Tensor,  # [B] int64
    query_start_loc: torch.Tensor,  # [B + 1] int64
    scale: float,
    block_m: int,  # rows of one program: a power of two >= 16 and >= G
    tile: int,  # keys per iteration: a power of two >= 16
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # split-KV buffers (see above)
    cascade: CascadePrefix | None = None,  # needs parts: its pass writes part 0, the requests' the rest
) -> None:
    """out = causal paged attention of every packed query row; split over parts[1].shape[2] segments
    of keys, then reduced, when parts are given. With a cascade, its shared keys in one pass of their
    own (part 0), the requests' keys past them in the other parts."""
    t, hq, d = q.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    num_parts = parts[1].shape[2] if parts is not None else 1
    part_out, part_max, part_sum = parts if parts is not None else (out, out, out)  # unused when not split
    common = (q.stride(0), q.stride(1))

    def launch(tables, lens, starts, num_reqs, segments, kv_start, kv_end, seg_base, rows):
        consts = attention_constants(q.dtype, hq, hkv, d, block_size, rows, tile, parts is not None)
        _attention_kernel[(t // consts["BLOCK_Q"] + num_reqs, hkv, segments)](
            out, part_out, part_max, part_sum, q, kv_cache, tables, lens, starts, scale * LOG2E, num_reqs,
            segments, kv_start, kv_end, seg_base, num_parts, *common, tables.stride(0), kv_cache.stride(0),
            **consts,
        )  # fmt: skip

    no_end = 2**31 - 1
    if cascade is not None:
        launch(cascade.table, cascade.seq_lens, cascade.query_start, 1, 1, 0, cascade.length, 0, cascade.block_m)
    first = 1 if cascade is not None else 0
    launch(block_tables, seq_lens, query_start_loc, seq_lens.shape[0], num_parts - first,
           cascade.length if cascade is not None else 0, no_end, first, block_m)  # fmt: skip
    if parts is not None:
        _reduce_kernel[(t * hq,)](out, part_out, part_max, part_sum, num_parts, **reduce_constants(d, num_parts))
