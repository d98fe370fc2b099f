"""Per-step batch layout for attention, built once per step by the runner and shared by all layers.

Tokens of the step are packed: request b owns query rows query_start_loc[b]:query_start_loc[b+1].
Its context (already cached tokens + this step's tokens) has seq_lens[b] tokens, living in the
paged cache at blocks block_tables[b, :ceil(seq_lens[b] / block_size)].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int  # T, packed query tokens this step
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    # Host copies, so that backends plan on the host without a device sync.
    query_lens: list[int]
    seq_lens_host: list[int]
    query_start_loc_host: torch.Tensor  # [B + 1] int64 on the CPU
    block_tables_host: torch.Tensor  # [B, max_blocks] int64 on the CPU
    positions: torch.Tensor  # [T] int64, absolute position of each query token
    # Set only on the persistent metadata of a captured decode graph (worker/cuda_graphs.py): every
    # query_len is 1, every context is at most this many tokens, and a step's values live only in the
    # device tensors above (refreshed before each replay); the host copies keep their capture-time
    # values. A graph-safe backend (AttentionBackend.graph_safe) then plans from this bound alone.
    graph_max_seq_len: Optional[int] = None
    # Backend-private precomputed state (index tensors, masks), built by the backend's
    # `prepare` once per step and reused by every layer.
    backend_state: Any = field(default=None)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a packed step: request b computes positions seq_lens[b]-query_lens[b] .. seq_lens[b]-1.

    block_tables[b] must cover ceil(seq_lens[b] / block_size) blocks. Vectorized over tokens.
    """
    num_reqs = len(query_lens)
    width = max((len(t) for t in block_tables), default=1)  # tables right-padded with block 0
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    tables = tables.view(num_reqs, width)
    qlens = torch.tensor(query_lens, dtype=torch.long)
    slens = torch.tensor(seq_lens, dtype=torch.long)
    starts = torch.zeros(num_reqs + 1, dtype=torch.long)
    torch.cumsum(qlens, 0, out=starts[1:])
    num_tokens = int(starts[-1])

    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), qlens)  # [T]
    positions = (slens - qlens)[req_of_token] + torch.arange(num_tokens) - starts[req_of_token]  # [T]
    slots = tables[req_of_token, positions // block_size] * block_size + positions % block_size  # [T]
    return AttentionMetadata(
        num_tokens=num_tokens,
        block_size=block_size,
        slot_mapping=slots.to(device),
        query_start_loc=starts.to(device),
        seq_lens=slens.to(device),
        block_tables=tables.to(device),
        query_lens=list(query_lens),
        seq_lens_host=list(seq_lens),
        query_start_loc_host=starts,
        block_tables_host=tables,
        positions=positions.to(device),
    )
