"""Applying a step's grammar bitmask to the logits, in place, before sampling: temperature, top-k/p,
sampling and logprobs all see the masked distribution. Rows without a grammar are not touched.

Bitmask layout (xgrammar's): int32 [N, W], W * 32 >= V; bit j of word w set = token 32 * w + j allowed.

On a CPU the bits are unpacked by numpy (SIMD) and the disallowed tokens filled row by row: 16 rows of
the default model's 49,152 logits in 0.2-0.5 ms, where xgrammar's own CPU kernel, which writes token by
token, takes 4.1 ms when few tokens are allowed (inside a JSON number: 172) and 0.05 ms when nearly all
are (inside a string).
"""
from __future__ import annotations

import sys

import numpy as np
import torch


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits[rows[i], t] = -inf for every token t that bitmask row i does not allow.

    logits: [S, V] float32 / bfloat16 / float16; bitmask: [len(rows), W] int32 on the host."""
    vocab = logits.shape[-1]
    assert bitmask.shape[-1] * 32 >= vocab and bitmask.shape[0] == len(rows)
    if logits.device.type != "cpu" or sys.byteorder != "little":  # the byte view below is little-endian's
        apply_grammar_bitmask_reference(logits, bitmask.to(logits.device, non_blocking=True), rows)
        return
    # Inverted bytes, unpacked least significant bit first: [N, W * 32] bool, True = disallowed.
    disallowed = np.unpackbits(np.invert(bitmask.numpy().view(np.uint8)), axis=1, bitorder="little")
    disallowed = disallowed.view(np.bool_)[:, :vocab]
    if logits.dtype == torch.float32:
        out = logits.numpy()
        for i, row in enumerate(rows):
            np.copyto(out[row], -np.inf, where=disallowed[i])
        return
    mask = torch.from_numpy(disallowed)
    for i, row in enumerate(rows):
        logits[row].masked_fill_(mask[i], float("-inf"))


def apply_grammar_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """The torch-native version (any device): unpack the bits, fill the disallowed tokens."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :vocab].bool()  # [N, V]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
