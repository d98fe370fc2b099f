"""CPU attention backend: decode rows read the paged cache in place (C++ kernel, ops/cpu_kernels.cpp).

Per step the batch splits three ways:
- decode rows (one query token): the in-place paged kernel, one pass over each request's blocks,
  no gather, no padding, no mask tensor;
- prefill chunks with no cached context (a fresh prompt's first chunk): attention straight on
  this step's packed q/k/v rows, the cache is only written: in bf16 with AMX the prefill kernel
  (all such chunks in one call; 8 x 256 tokens 1.65 vs 2.5-2.9 ms per layer for SDPA with
  its copies), else causal SDPA (the reference), one call per run of equal-length chunks;
- prefill chunks after cached context (prefix-cache hits, later chunks): short ones (query rows x
  keys <= max_kernel_chunk_work) through the paged kernel like decodes, longer ones through the
  torch reference's gather + SDPA, whose GEMMs beat the kernel's loops there. Default model, one
  chunk beside 16 decodes, per layer: 15 rows after 241 tokens 0.37 vs 0.87 ms, 100 after 156
  0.71 vs 1.05, 240 after 16 0.98 vs 1.25; 64 after 1,024 1.74 vs 1.57, 256 after 256 2.31 vs
  1.73, 1,024 after 1,024 31 vs 14. A step usually holds one such chunk: the prompt its budget
  split.
Cascade for shared prefixes: when enough requests of the step that read cached context share
their leading blocks (prefix caching hands them the same block ids), attention over those shared
blocks runs once for all their query rows, with each row's log-sum-exp: the AMX kernel reading the
blocks in place where they are consecutive and the cascade covers every row of the step (1,024
keys: 256 rows 1.30 -> 0.85 ms per layer, 2,048 rows 8.3 -> 7.0 ms), else one dense SDPA (GEMMs);
the kernel continues each row from that state over its own blocks. The shared keys are then read
once per step instead of once per request.
Chosen by get_attention_backend only where the kernel applies (CPU, float32/bfloat16, library built).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_ref import Group, attend_group, build_group, write_kv_cache
from kvserve.ops import cpu_ops


@dataclass
class _Cascade:
    reqs: torch.Tensor  # [n] int64: requests whose attention starts with the shared blocks
    rows: torch.Tensor  # [R] int64: their packed query rows
    all_rows: bool  # rows are every row of the step (then the shared part needs no gather or scatter)
    prefix_blocks: torch.Tensor  # [P] int64: the shared leading blocks, visible to every row in full
    prefix_first: Optional[int]  # the first of them when their ids are consecutive (then read in place)

    @property
    def in_place_over_all_rows(self) -> bool:
        """The case the AMX prefix kernel takes: every row of the step, consecutive shared blocks."""
        return self.all_rows and self.prefix_first is not None


@dataclass
class _CpuPlan:
    kernel_reqs: torch.Tensor  # [n] int64: decodes and short chunks after context (the paged kernel)
    # Prefill chunks that start at position 0, as runs of equal-length chunks in adjacent rows:
    # (first row, rows per chunk, chunks); a run is one batched SDPA call (bit-identical to one call
    # per chunk, measured 15% faster for 8 x 256 tokens).
    fresh: list[tuple[int, int, int]]
    fresh_starts: torch.Tensor  # [P] int64: the same chunks' first rows, for the AMX kernel
    fresh_lens: torch.Tensor  # [P] int64: and their lengths
    context: Optional[Group]  # torch-reference group of prefill chunks after cached context
    cascade: Optional[_Cascade]  # when set, it covers the decode and context requests above


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"
    # The kernel reads only slots inside each context; the reference's whole-block gathers for
    # context chunks replace the rest by 0. So blocks need no zeroing on first use.
    needs_zeroed_blocks = False

    def __init__(
        self, min_cascade_tokens: int = 256, min_cascade_requests: int = 4, max_kernel_chunk_work: int = 65536
    ) -> None:
        # Below these sizes the per-request kernel reads the shared blocks cheaply enough.
        self.min_cascade_tokens, self.min_cascade_requests = min_cascade_tokens, min_cascade_requests
        # A chunk after context goes through the kernel when its query rows x keys are at most this.
        self.max_kernel_chunk_work = max_kernel_chunk_work

    def prepare(self, meta: AttentionMetadata) -> None:
        decode, fresh, context = [], [], []
        starts = meta.query_start_loc_host.tolist()
        for b, (n, s) in enumerate(zip(meta.query_lens, meta.seq_lens_host)):
            if n == 1:
                decode.append(b)
            elif n == s:
                if fresh and fresh[-1][1] == n and fresh[-1][0] + n * fresh[-1][2] == starts[b]:
                    fresh[-1] = (fresh[-1][0], n, fresh[-1][2] + 1)
                else:
                    fresh.append((starts[b], n, 1))
            else:
                context.append(b)
        cascade = self._plan_cascade(meta, decode + context, starts)
        kernel = decode
        if cascade is None:  # (else the cascade covers them all) short context chunks join the decodes
            work = {b: meta.query_lens[b] * meta.seq_lens_host[b] for b in context}
            kernel = sorted(decode + [b for b in context if work[b] <= self.max_kernel_chunk_work])
            context = [b for b in context if work[b] > self.max_kernel_chunk_work]
        chunks = [(start + i * n, n) for start, n, count in fresh for i in range(count)]
        meta.backend_state = _CpuPlan(
            kernel_reqs=torch.tensor(kernel, dtype=torch.long),
            fresh=fresh,
            fresh_starts=torch.tensor([c[0] for c in chunks], dtype=torch.long),
            fresh_lens=torch.tensor([c[1] for c in chunks], dtype=torch.long),
            context=build_group(meta, context, unwritten_may_be_nan=True) if context and cascade is None else None,
            cascade=cascade,
        )

    def _plan_cascade(self, meta: AttentionMetadata, reqs: list[int], starts: list[int]) -> Optional[_Cascade]:
        """The longest run of leading blocks all `reqs` share and every one of their rows sees whole."""
        if len(reqs) < self.min_cascade_requests:
            return None
        bs = meta.block_size
        first_pos = min(meta.seq_lens_host[b] - meta.query_lens[b] for b in reqs)  # earliest query position
        limit = min(first_pos // bs, meta.block_tables_host.shape[1])
        if limit * bs < self.min_cascade_tokens:
            return None
        tables = meta.block_tables_host[reqs, :limit]  # [n, limit]
        shared = int((tables == tables[:1]).all(dim=0).cumprod(dim=0).sum())
        if shared * bs < self.min_cascade_tokens:
            return None
        rows = [r for b in sorted(reqs) for r in range(starts[b], starts[b + 1])]
        blocks = tables[0, :shared].clone()
        consecutive = bool((blocks[1:] - blocks[:-1] == 1).all())
        return _Cascade(
            reqs=torch.tensor(sorted(reqs), dtype=torch.long),
            rows=torch.tensor(rows, dtype=torch.long),
            all_rows=len(rows) == starts[-1],
            prefix_blocks=blocks,
            prefix_first=int(blocks[0]) if consecutive else None,
        )

    def forward(self, q, k, v, kv_cache, meta, scale):
        if meta.backend_state is None:
            self.prepare(meta)
        plan = meta.backend_state
        if not cpu_ops.write_kv_cache(k, v, kv_cache, meta.slot_mapping):
            write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype)
        fresh_done = bool(plan.fresh) and cpu_ops.prefill_attention(
            q, k, v, out, plan.fresh_starts, plan.fresh_lens, scale
        )  # q, k, v: the step's strided rows, read in place (as the references below do)
        if plan.cascade is not None:
            init_out, init_lse = _shared_prefix_attention(q, kv_cache, plan.cascade, scale)
            self._kernel(q, kv_cache, out, meta, plan.cascade.reqs, scale,
                         len(plan.cascade.prefix_blocks), init_out, init_lse)  # fmt: skip
        elif plan.kernel_reqs.numel():
            self._kernel(q, kv_cache, out, meta, plan.kernel_reqs, scale)
        for start, n, count in [] if fresh_done else plan.fresh:  # the reference, where the kernel declines
            rows = slice(start, start + n * count)
            # 4-D inputs: with 3-D ones SDPA takes its slow math path (10x slower, measured).
            o = F.scaled_dot_product_attention(
                *(t[rows].unflatten(0, (count, n)).transpose(1, 2) for t in (q, k, v)),
                is_causal=True, scale=scale, enable_gqa=True,
            )  # fmt: skip  # [count, H, n, D]
            out[rows] = o.transpose(1, 2).flatten(0, 1)
        if plan.context is not None:
            attend_group(plan.context, q, kv_cache, out, scale)
        return out

    @staticmethod
    def _kernel(q, kv_cache, out, meta, reqs, scale, skip_blocks=0, init_out=None, init_lse=None) -> None:
        applied = cpu_ops.paged_attention(
            q.contiguous(),  # the kernel reads q as contiguous rows; the step hands over strided views
            kv_cache, out, meta.block_tables_host, meta.seq_lens, meta.query_start_loc_host, reqs, scale,
            skip_blocks, init_out, init_lse,
        )  # fmt: skip
        if not applied:
            raise RuntimeError("the CPU attention kernel does not apply to these tensors; use the torch backend")


def _shared_prefix_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, c: _Cascade, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the cascade's rows over the shared blocks only, as the kernel's initial state:
    (out [T, Hq, D] in q.dtype, lse [T, Hq] float32); only the cascade's rows are filled. The AMX
    kernel (cpu_ops.prefix_attention) where it applies; the SDPA below is its reference.
    GQA: each kv head's G query heads of all R rows become one query sequence of R * G rows.
    The shared keys are a strided view of the cache when their blocks are consecutive, and with
    all rows in the cascade nothing is gathered or scattered: 256 decode rows over 1,024 shared
    keys per layer 1.50 -> 1.25 ms, 2,048 rows 8.7 -> 7.6 ms (the SDPA is ~1.03 / ~6.7 of them)."""
    if c.in_place_over_all_rows:  # the AMX kernel reads the run of blocks in place
        out, lse = torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape[:2], dtype=torch.float32)
        if cpu_ops.prefix_attention(q, kv_cache, c.prefix_first, c.prefix_blocks.numel(), out, lse, scale):
            return out, lse
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    num_heads = q.shape[1]
    g = num_heads // num_kv_heads

    def prefix(cache: torch.Tensor) -> torch.Tensor:  # [num_blocks, bs, Hkv, D] -> [1, Hkv, P, D] (strided)
        n, first = c.prefix_blocks.numel(), c.prefix_first
        blocks = cache[first : first + n] if first is not None else cache.index_select(0, c.prefix_blocks)
        return blocks.view(-1, num_kv_heads, head_dim).transpose(0, 1)[None]

    rows = q if c.all_rows else q.index_select(0, c.rows)  # [R, Hq, D]
    r = rows.shape[0]
    qh = rows.view(r, num_kv_heads, g, head_dim).permute(1, 0, 2, 3).reshape(1, num_kv_heads, r * g, head_dim)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, prefix(kv_cache[0]), prefix(kv_cache[1]), 0.0, False, scale=scale
    )  # o: [1, Hkv, R * G, D], lse: [1, Hkv, R * G] float32
    o = o.view(num_kv_heads, r, g, head_dim).permute(1, 0, 2, 3).reshape(r, num_heads, head_dim)  # a copy
    lse = lse.view(num_kv_heads, r, g).permute(1, 0, 2).reshape(r, num_heads).float()  # a copy
    if c.all_rows:
        return o, lse
    init_out = torch.empty_like(q)
    init_out[c.rows] = o
    init_lse = torch.empty(q.shape[:2], dtype=torch.float32)
    init_lse[c.rows] = lse
    return init_out, init_lse
