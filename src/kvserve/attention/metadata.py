"""Per-step batch layout for attention, built once per step by the runner and shared by all layers.

Tokens of the step are packed: request b owns query rows query_start_loc[b]:query_start_loc[b+1].
Its context (already cached tokens + this step's tokens) has seq_lens[b] tokens, living in the
paged cache at blocks block_tables[b, :ceil(seq_lens[b] / block_size)].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int  # T, packed query tokens this step
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    query_lens: list[int]  # host copies, for backends that plan on the host
    seq_lens_host: list[int]
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

    block_tables[b] must cover ceil(seq_lens[b] / block_size) blocks.
    """
    slots: list[int] = []
    for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(slen - qlen, slen):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return AttentionMetadata(
        num_tokens=starts[-1],
        block_size=block_size,
        slot_mapping=as_long(slots),
        query_start_loc=as_long(starts),
        seq_lens=as_long(seq_lens),
        block_tables=as_long(padded).reshape(len(block_tables), width),
        query_lens=list(query_lens),
        seq_lens_host=list(seq_lens),
    )
