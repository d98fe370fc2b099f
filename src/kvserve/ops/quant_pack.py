"""Weights made into the block types the quant kernels compute with (torch and gguf-py's type ids; no kernels).

- int8 (--quantization int8): symmetric, one scale per output channel (row): scale = max|w| / 127
  rounded to float16, q = round(w / scale) in [-127, 127]; kept as GGML Q8_0 blocks, each of a row's
  blocks carrying the row's scale.
- int4 (--quantization int4): symmetric, one scale per group of 128 input values of a row (64 or 32
  where the row is not a multiple of 128):
  scale = max|w| / 7 rounded to float16, q = round(w / scale) in [-8, 7]; kept as GGML Q4_0 blocks
  (value = scale * (nibble - 8)), the four blocks of a group carrying its scale.
- AWQ / GPTQ int4 (q, zero, float16 scale per group): kvserve's Q4_Z blocks, value = scale * (q - zero),
  every value exactly what dequantizing the checkpoint in float32 gives.
Every function takes and returns CPU tensors; a row's blocks are [K / block values] in order.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

Q8_0, Q4_0 = int(GGMLQuantizationType.Q8_0), int(GGMLQuantizationType.Q4_0)
Q4_Z_GROUP, Q4_Z_BYTES = 128, 68


def _f16_bytes(scale: torch.Tensor) -> torch.Tensor:
    """float16 [...] -> uint8 [..., 2], little-endian."""
    return scale.to(torch.float16).contiguous().view(torch.uint8).view(*scale.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [..., 32] in [0, 15] -> [..., 16]: value j in the low nibble of byte j, j + 16 in its high one."""
    return q[..., :16] | (q[..., 16:] << 4)


def _symmetric(w: torch.Tensor, group: int, qmax: int, qmin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int32 [N, K / group, group], float16 scale [N, K / group]): scale = max|w| / qmax
    in float16 (1 for an all-zero group), q = round(w / scale) clamped to [qmin, qmax]."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input features are not a whole number of {group}-value quantization groups")
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(dim=-1) / qmax).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp_(qmin, qmax).to(torch.int32)
    return q, scale


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] float -> Q8_0 blocks uint8 [N, K / 32 * 34]: int8 with one float16 scale per row."""
    n, k = w.shape
    q, scale = _symmetric(w, k, 127, -127)  # one group: the whole row
    blocks = torch.empty(n, k // 32, 34, dtype=torch.uint8)
    blocks[..., :2] = _f16_bytes(scale)  # [N, 1, 2] over every block of the row
    blocks[..., 2:] = q.to(torch.int8).view(torch.uint8).view(n, k // 32, 32)
    return blocks.view(n, -1)


def quantize_q4_0(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """w [N, K] float -> Q4_0 blocks uint8 [N, K / 32 * 18]: int4 with one float16 scale per `group`
    values (where K is not a multiple of `group`, the largest of 64 and 32 that divides it)."""
    n, k = w.shape
    group = next((g for g in (group, 64, 32) if k % g == 0), group)
    q, scale = _symmetric(w, group, 7, -8)
    blocks = torch.empty(n, k // group, group // 32, 18, dtype=torch.uint8)
    blocks[..., :2] = _f16_bytes(scale).unsqueeze(2)  # [N, G, 1, 2] over the group's blocks
    blocks[..., 2:] = _nibbles((q + 8).to(torch.uint8).view(n, k // group, group // 32, 32))
    return blocks.view(n, -1)


def pack_q4_z(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 15], scale float16 [N, K / G], zero integers [N, K / G] in [0, 16] ->
    Q4_Z blocks uint8 [N, K / 128 * 68]; G (the checkpoint's group size) a multiple of 128, each
    group's scale and zero repeated over its 128-value blocks."""
    n, k = q.shape
    if k % Q4_Z_GROUP or scale.shape[1] == 0 or k % scale.shape[1] or (k // scale.shape[1]) % Q4_Z_GROUP:
        raise ValueError(f"int4 groups of {k // max(scale.shape[1], 1)} over {k} inputs: kvserve needs a multiple of 128")
    if scale.dtype != torch.float16:
        raise ValueError(f"int4 scales must be float16 (AWQ / GPTQ store them so), got {scale.dtype}")
    nb = k // Q4_Z_GROUP
    repeat = nb // scale.shape[1]
    blocks = torch.zeros(n, nb, Q4_Z_BYTES, dtype=torch.uint8)
    blocks[..., :2] = _f16_bytes(scale.repeat_interleave(repeat, dim=1))
    blocks[..., 2] = zero.repeat_interleave(repeat, dim=1).to(torch.uint8)
    blocks[..., 4:] = _nibbles(q.to(torch.uint8).view(n, nb, 4, 32)).view(n, nb, 64)
    return blocks.view(n, -1)


def dequantize_q4_z(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Q4_Z blocks uint8 [N, K / 128 * 68] -> float32 [N, K]: scale * (q - zero) (the reference)."""
    n, nb = blocks.shape[0], k // Q4_Z_GROUP
    b = blocks.reshape(n, nb, Q4_Z_BYTES)
    scale = b[..., :2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    zero = b[..., 2:3].float()
    qs = b[..., 4:].reshape(n, nb, 4, 16)
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, nb, Q4_Z_GROUP).float()
    return (scale * (q - zero)).reshape(n, k)
