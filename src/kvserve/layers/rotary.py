"""Rotary position embedding (neox / HF `rotate_half` layout) on packed q and k.

Each head's vector is split in halves (x1, x2) and rotated pairwise:
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
with angle = position * inv_freq[i]. inv_freq and the cos/sin scale follow
`transformers.modeling_rope_utils` for rope types default, linear, llama3 and yarn.

The cos/sin table is a non-persistent buffer, so it follows `.to(device)`. It is allocated
uninitialised (so the module can be built on the meta device and materialised with `to_empty`);
whoever materialises the model calls `init_cache()` before the first forward.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from kvserve.ops import cpu_ops, gpu_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, linear ramp between; cos/sin scaled."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:  # dimension index that rotates num_rotations times
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def rope_inv_freq(
    head_dim: int, base: float, rope_scaling: Optional[dict[str, Any]], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim / 2] float32, attention_factor multiplying cos and sin)."""
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, base, rope_scaling, max_position_embeddings)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling), 1.0
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _cache_length(max_position_embeddings: int, rope_scaling: Optional[dict[str, Any]]) -> int:
    """Positions covered by the table: scaled context for linear and yarn (vLLM's rule)."""
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return int(max_position_embeddings * rope_scaling["factor"])
    if rope_type == "yarn" and rope_scaling.get("factor"):
        scaled = int(rope_scaling["original_max_position_embeddings"] * rope_scaling["factor"])
        return max(max_position_embeddings, scaled)
    return max_position_embeddings


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_position_embeddings: int, base: float, rope_scaling: Optional[dict[str, Any]] = None
    ) -> None:
        super().__init__()
        self.head_dim, self.base, self.rope_scaling = head_dim, base, rope_scaling
        self.max_position_embeddings = max_position_embeddings
        rope_type = (rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.max_positions = _cache_length(max_position_embeddings, rope_scaling)
        # [P, head_dim] float32: cos in the first half, sin in the second. Filled by init_cache().
        self.register_buffer(
            "cos_sin_cache", torch.empty(self.max_positions, head_dim, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def init_cache(self) -> None:
        """(Re)compute the cos/sin table on the buffer's current device."""
        inv_freq, attention_factor = rope_inv_freq(
            self.head_dim, self.base, self.rope_scaling, self.max_position_embeddings
        )
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        cache = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.device)

    def cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [T] long -> [T, D] float32 (cos | sin). Looked up once per step, shared by all layers."""
        return self.cos_sin_cache[positions]

    def forward(
        self, cos_sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin: [T, D] from cos_sin(positions); q: [T, Hq * D], k: [T, Hkv * D] -> rotated (q, k).

        On a CPU the C++ kernel, on a GPU a Triton kernel, rotates q and k in place (they are views
        of the step's fresh qkv tensor) and returns them; `_rotate` is the torch-native reference."""
        if cpu_ops.rotary_(q, k, cos_sin, self.head_dim) or gpu_ops.rotary_(q, k, cos_sin, self.head_dim):
            return q, k
        cos, sin = cos_sin.chunk(2, dim=-1)  # [T, D/2] each
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, self.head_dim)  # [T, H, D]
        x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2]
        # cos/sin cast to the activation dtype before multiplying, as HF does.
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).view(t, -1)
