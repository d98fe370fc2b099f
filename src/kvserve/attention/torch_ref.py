"""Torch-native paged attention: the reference every faster backend is tested against. Runs anywhere.

Per step, `prepare` splits the batch into two groups (single-token decodes and multi-token
prefill chunks) so that one long prefill does not pad every decode row to its length. For each
group it builds, once, the index tensors that gather queries and whole cached blocks through the
block tables, and the boolean causal mask. Each layer then does one gather and one SDPA per group.
Whole-block gathers move contiguous block_size * Hkv * D runs (several times faster on CPU than
gathering single slots); the slots past a request's context that come along are masked out, which
is why the cache must hold finite values there (the runner zeroes blocks on first use).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata


@dataclass
class Group:
    q_rows: torch.Tensor  # [B, Qmax] packed token row of each query (padding points at row 0)
    block_ids: torch.Tensor  # [B, nblk] the blocks holding each request's context (padded with block 0)
    mask: torch.Tensor  # [B, 1, Qmax, nblk * block_size] True where query may attend
    # [B * Qmax] bool, real (non-padding) query rows; None: every row is real and query b is packed
    # row b (a decode graph's group: no boolean indexing, which would sync with the host)
    valid: Optional[torch.Tensor]
    out_rows: torch.Tensor  # [n_valid] packed row each real query writes to
    # [B, 1, nblk * block_size, 1] True at slots inside each context; set when the cache may hold
    # NaN in slots never written (blocks not zeroed), which the gathered K/V then replace by 0.
    written: Optional[torch.Tensor] = None


def build_group(meta: AttentionMetadata, reqs: list[int], unwritten_may_be_nan: bool = False) -> Group:
    device = meta.slot_mapping.device
    bs = meta.block_size
    qlens = torch.tensor([meta.query_lens[b] for b in reqs], dtype=torch.long)
    slens = torch.tensor([meta.seq_lens_host[b] for b in reqs], dtype=torch.long)
    starts = meta.query_start_loc_host[reqs]
    q_max, k_max = int(qlens.max()), int(slens.max())

    i = torch.arange(q_max)
    q_valid = i[None, :] < qlens[:, None]  # [B, Qmax]
    q_rows = torch.where(q_valid, starts[:, None] + i[None, :], torch.zeros((), dtype=torch.long))

    num_blocks = (k_max + bs - 1) // bs
    block_ids = meta.block_tables_host[reqs][:, :num_blocks]
    j = torch.arange(num_blocks * bs)

    q_pos = (slens - qlens)[:, None] + i[None, :]  # absolute position of each query
    mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < slens[:, None, None])
    # Padding query rows attend to key 0 only, so SDPA never sees an all-masked row (NaN).
    mask |= (~q_valid)[:, :, None] & (j == 0)[None, None, :]

    valid = q_valid.reshape(-1)
    return Group(
        q_rows=q_rows.to(device),
        block_ids=block_ids.to(device),
        mask=mask[:, None].to(device),
        valid=valid.to(device),
        out_rows=q_rows.reshape(-1)[valid].to(device),
        written=(j[None, :] < slens[:, None])[:, None, :, None].to(device) if unwritten_may_be_nan else None,
    )


def build_decode_graph_group(meta: AttentionMetadata) -> Group:
    """The one group of a captured decode step (meta.graph_max_seq_len set), from its device tensors
    only, shapes fixed by B and the table width W: query b (packed row b) attends to keys
    0 .. seq_lens[b] - 1 of all W blocks of its table. Every table entry must name a block of finite
    values (unused ones: the graph runner's scratch block), since whole blocks are gathered."""
    b, width = meta.block_tables.shape
    device = meta.block_tables.device
    j = torch.arange(width * meta.block_size, device=device)
    mask = (j[None, :] < meta.seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, W * block_size]
    rows = torch.arange(b, device=device)
    return Group(q_rows=rows[:, None], block_ids=meta.block_tables, mask=mask, valid=None, out_rows=rows)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    # Decode graphs attend over each row's whole table (max_model_len keys): static shapes cost
    # gathering keys past the context, where Triton's kernel stops at it.
    graph_safe = True

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.graph_max_seq_len is not None:
            meta.backend_state = [build_decode_graph_group(meta)]
            return
        decode = [b for b, n in enumerate(meta.query_lens) if n == 1]
        prefill = [b for b, n in enumerate(meta.query_lens) if n > 1]
        meta.backend_state = [build_group(meta, g) for g in (decode, prefill) if g]

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        if meta.backend_state is None:
            self.prepare(meta)
        out = torch.empty_like(q)
        for g in meta.backend_state:
            attend_group(g, q, kv_cache, out, scale)
        return out


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> cache slots slot_mapping [T] of kv_cache [2, num_blocks, block_size, Hkv, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)  # [num_slots, Hkv, D]
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def attend_group(g: Group, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Gather the group's queries and whole context blocks, one SDPA, scatter into out [T, Hq, D]."""
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    b, q_max = g.q_rows.shape
    # index_select on dim 0 copies whole rows; it is about twice as fast as advanced indexing on CPU.
    qg = q.index_select(0, g.q_rows.flatten()).view(b, q_max, -1, head_dim).transpose(1, 2)  # [B, Hq, Qmax, D]
    blocks = g.block_ids.flatten()
    kg = kv_cache[0].index_select(0, blocks).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, K, D]
    vg = kv_cache[1].index_select(0, blocks).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
    if g.written is not None:  # masked scores still multiply NaN values: 0 * NaN = NaN
        kg, vg = kg.masked_fill(~g.written, 0), vg.masked_fill(~g.written, 0)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True)
    o = o.transpose(1, 2).reshape(-1, q.shape[1], head_dim)  # [B * Qmax, Hq, D]
    if g.valid is None:
        out.copy_(o)  # [B, Hq, D]: Qmax is 1
    else:
        out[g.out_rows] = o[g.valid]
