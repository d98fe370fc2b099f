"""GPU attention backend (CUDA / ROCm): the Triton kernels of attention/triton_kernels.py, tested
against attention/torch_ref.py. Needs triton; get_attention_backend picks it on a GPU when it imports.

Per layer: one kernel writes the step's k/v into the paged cache, one kernel attends every packed
query row (decodes and prompt chunks alike: no per-kind groups) reading keys in place through the
block tables. When the step has too few programs to fill the GPU (a few long decodes: one program
per q-block and kv head), the keys of each request are split into segments, one program each, and
a second kernel combines the segments' partial results (log-sum-exp).

The plan (tile sizes, segments, the split-KV buffers) depends only on the step's metadata and the
layer's head shape, so it is made once per step and shape, on the host from the metadata's host
copies (no device sync), and shared by every layer (layers run one after another, so they can
share the buffers).

Cascade (shared prefixes): when every request of an eager step starts with the same cached blocks
(prefix caching hands them the same block ids: one system prompt, n > 1) of at least 256 tokens,
and there are at least 8 requests (vLLM's thresholds for its cascade), those keys are attended in
one pass for all the step's rows as if they were one request's queries, 64 rows per program, so
each shared key is read once per 64 rows instead of once per request; a second pass attends each
request's own keys past them, and the split-KV reduction merges the two (log-sum-exp). Decode
graphs do not take it (their plan is fixed at capture).

Decode graphs (worker/cuda_graphs.py): the kernels read seq_lens, block tables, slots and query
starts from device tensors, and the grid depends only on T and B, so a decode step is capturable
once its plan is fixed: with meta.graph_max_seq_len set the segments are planned for that bound
(each request's tiles are divided among them in the kernel, from its device seq_len; segments past
a short context stay empty and weigh nothing in the reduction), and the split-KV buffers, made
during capture, belong to the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from kvserve.attention import triton_kernels as kernels
from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata


@dataclass
class Plan:
    block_m: int  # query rows (queries x heads of one kv head) per program
    tile: int  # keys per iteration
    # Split-KV buffers: [T, Hq, S, D] partial outputs, [T, Hq, S] maxima and sums (float32), or None.
    parts: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    cascade: Optional[kernels.CascadePrefix] = None  # the shared keys' pass (writes part 0 of parts)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    needs_zeroed_blocks = False  # loads past a request's context are masked: no slot is read unwritten
    graph_safe = True  # see the module docstring

    def __init__(
        self,
        target_programs: Optional[int] = None,  # programs that fill the device; None: 2 per SM
        max_segments: int = 16,  # 1: never split
        min_segment_tiles: int = 4,  # at least this many tiles of keys per segment
        tile: int = 32,
        min_cascade_tokens: int = 256,  # shared keys below this: each request reads them itself
        min_cascade_requests: int = 8,
        cascade_block_m: int = 64,  # rows per program of the shared keys' pass
    ) -> None:
        self.target_programs = target_programs
        self.max_segments = max_segments
        self.min_segment_tiles = min_segment_tiles
        self.tile = tile
        self.min_cascade_tokens, self.min_cascade_requests = min_cascade_tokens, min_cascade_requests
        self.cascade_block_m = cascade_block_m

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.backend_state = {}  # (Hq, Hkv, D, dtype) -> Plan, filled by the first layer of that shape

    def forward(self, q, k, v, kv_cache, meta, scale):
        if not (_rows_contiguous(k) and _rows_contiguous(v) and q.stride(2) == 1):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kernels.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        if meta.backend_state is None:
            self.prepare(meta)
        hkv = kv_cache.shape[3]
        key = (q.shape[1], hkv, q.shape[2], q.dtype)
        plan = meta.backend_state.get(key)
        if plan is None:
            plan = meta.backend_state[key] = self.plan(meta, q, hkv)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
        if meta.num_tokens:
            kernels.paged_attention(
                q, kv_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                plan.block_m, plan.tile, plan.parts, plan.cascade,
            )  # fmt: skip
        return out

    def plan(self, meta: AttentionMetadata, q: torch.Tensor, hkv: int) -> Plan:
        """Rows per program, and segments: as many as make the step's programs reach the target,
        at most max_segments, each at least min_segment_tiles of the longest context's tiles."""
        t, hq, d = q.shape
        g = hq // hkv
        block_m = max(16, triton.next_power_of_2(g))
        programs = (t // (block_m // g) + len(meta.query_lens)) * hkv
        longest = meta.graph_max_seq_len  # a decode graph's bound: its host copies are not this step's
        if longest is None:
            longest = max(meta.seq_lens_host, default=0)
        cascade = self._cascade(meta, g) if meta.graph_max_seq_len is None else None
        # Tiles of the longest request's own pass, counted as the kernel counts them (from kv_start's tile).
        max_tiles = triton.cdiv(longest, self.tile) - (cascade.length // self.tile if cascade else 0)
        segments = max(1, min(
            self.max_segments,
            self._target(q.device) // max(programs, 1),
            max_tiles // self.min_segment_tiles,
        ))  # fmt: skip
        num_parts = segments + (1 if cascade else 0)
        parts = None
        if num_parts > 1:
            f32 = dict(dtype=torch.float32, device=q.device)
            outs = torch.empty(t, hq, num_parts, d, **f32)
            parts = (outs, torch.empty(t, hq, num_parts, **f32), torch.empty(t, hq, num_parts, **f32))  # maxima, sums
        return Plan(block_m=block_m, tile=self.tile, parts=parts, cascade=cascade)

    def _cascade(self, meta: AttentionMetadata, g: int) -> Optional[kernels.CascadePrefix]:
        """The leading blocks every request of the step shares and every query sees whole (all of
        them before the earliest query position), when long and shared widely enough to pay."""
        reqs = len(meta.query_lens)
        if reqs < self.min_cascade_requests or not meta.num_tokens:
            return None
        bs = meta.block_size
        first_pos = min(s - n for s, n in zip(meta.seq_lens_host, meta.query_lens))  # earliest query position
        limit = min(first_pos // bs, meta.block_tables_host.shape[1])
        if limit * bs < self.min_cascade_tokens:
            return None
        tables = meta.block_tables_host[:, :limit]  # [B, limit]
        shared = int((tables == tables[:1]).all(dim=0).cumprod(dim=0).sum())
        length = shared * bs
        if length < self.min_cascade_tokens:
            return None
        lens = torch.tensor([length + meta.num_tokens, 0, meta.num_tokens], dtype=torch.long)
        lens = lens.to(meta.block_tables.device, non_blocking=True)
        return kernels.CascadePrefix(
            length=length, table=meta.block_tables[:1, :shared], seq_lens=lens[:1], query_start=lens[1:],
            block_m=max(self.cascade_block_m, triton.next_power_of_2(g)),
        )  # fmt: skip

    def _target(self, device: torch.device) -> int:
        if self.target_programs is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            self.target_programs = 2 * sms
        return self.target_programs


def _rows_contiguous(x: torch.Tensor) -> bool:
    """x [T, H, D]: each token's H * D values contiguous (rows may be apart: a view of a fused qkv)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]
