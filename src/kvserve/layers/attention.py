"""Attention layer: the model's view of paged attention. Holds its layer's KV cache, which the
model runner allocates and assigns (`layer.kv_cache`); reads batch layout from the forward context."""
from __future__ import annotations

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend
from kvserve.forward_context import get_attention_metadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, Hkv, D], set by the runner
        self.backend: AttentionBackend | None = None  # set by the runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq * D], k/v: [T, Hkv * D] -> [T, Hq * D], in the activations' dtype. Attention runs in
        the cache's dtype: bfloat16 under float32 activations (EngineArgs) rounds q, k, v on the way in."""
        meta = get_attention_metadata()
        t, dtype = q.shape[0], q.dtype
        if self.kv_cache is not None and self.kv_cache.dtype != dtype:
            q, k, v = q.to(self.kv_cache.dtype), k.to(self.kv_cache.dtype), v.to(self.kv_cache.dtype)
        out = self.backend.forward(
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            v.view(t, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            meta,
            self.scale,
        )
        return out.reshape(t, self.num_heads * self.head_dim).to(dtype)
