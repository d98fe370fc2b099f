"""Applying a step's grammar bitmask to the logits, in place, before sampling: temperature, top-k/p,
sampling and logprobs all see the masked distribution. Rows without a grammar are not touched.

Bitmask layout (xgrammar's): int32 [N, W], W * 32 >= V; bit j of word w set = token 32 * w + j allowed.
"""
from __future__ import annotations

import torch


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits[rows[i], t] = -inf for every token t that bitmask row i does not allow.

    logits: [S, V] float32 / bfloat16 / float16; bitmask: [len(rows), W] int32 on the host."""
    vocab = logits.shape[-1]
    assert bitmask.shape[-1] * 32 >= vocab and bitmask.shape[0] == len(rows)
    if logits.device.type == "cpu":
        # xgrammar's CPU kernel masks row r of the logits with row r of the bitmask, rows given by index.
        from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        apply_token_bitmask_inplace_cpu(logits, full, vocab, rows)
        return
    apply_grammar_bitmask_reference(logits, bitmask.to(logits.device, non_blocking=True), rows)


def apply_grammar_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """The torch-native version (any device): unpack the bits, fill the disallowed tokens."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :vocab].bool()  # [N, V]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
