"""CPU attention backend: decode rows read the paged cache in place (C++ kernel, ops/cpu_kernels.cpp).

Per step the batch splits three ways:
- decode rows (one query token): the in-place paged kernel, one pass over each request's blocks,
  no gather, no padding, no mask tensor;
- prefill chunks with no cached context (a fresh prompt's first chunk): causal SDPA straight on
  this step's packed q/k/v, one call per request, the cache is only written;
- prefill chunks after cached context (prefix-cache hits, later chunks): the torch reference's
  gather + SDPA, whose GEMMs are faster than the kernel's loops on long query runs.
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
class _CpuPlan:
    decode_reqs: torch.Tensor  # [n] int64, requests with one query row
    fresh: list[tuple[int, int]]  # (first row, rows) of prefill chunks that start at position 0
    context: Optional[Group]  # torch-reference group of prefill chunks after cached context
    seq_lens: torch.Tensor  # [B] int64 on the host


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"

    def prepare(self, meta: AttentionMetadata) -> None:
        decode, fresh, context = [], [], []
        starts = meta.query_start_loc_host.tolist()
        for b, (n, s) in enumerate(zip(meta.query_lens, meta.seq_lens_host)):
            if n == 1:
                decode.append(b)
            elif n == s:
                fresh.append((starts[b], n))
            else:
                context.append(b)
        meta.backend_state = _CpuPlan(
            decode_reqs=torch.tensor(decode, dtype=torch.long),
            fresh=fresh,
            context=build_group(meta, context) if context else None,
            seq_lens=torch.tensor(meta.seq_lens_host, dtype=torch.long),
        )

    def forward(self, q, k, v, kv_cache, meta, scale):
        if meta.backend_state is None:
            self.prepare(meta)
        plan = meta.backend_state
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        q = q.contiguous()
        out = torch.empty_like(q)
        if plan.decode_reqs.numel():
            applied = cpu_ops.paged_attention(
                q, kv_cache, out, meta.block_tables_host, plan.seq_lens, meta.query_start_loc_host,
                plan.decode_reqs, scale,
            )  # fmt: skip
            if not applied:
                raise RuntimeError("the CPU attention kernel does not apply to these tensors; use the torch backend")
        for start, n in plan.fresh:
            rows = slice(start, start + n)
            # 4-D inputs: with 3-D ones SDPA takes its slow math path (10x slower, measured).
            o = F.scaled_dot_product_attention(
                q[None, rows].transpose(1, 2), k[None, rows].transpose(1, 2), v[None, rows].transpose(1, 2),
                is_causal=True, scale=scale, enable_gqa=True,
            )  # fmt: skip  # [1, H, n, D]
            out[rows] = o[0].transpose(0, 1)
        if plan.context is not None:
            attend_group(plan.context, q, kv_cache, out, scale)
        return out
