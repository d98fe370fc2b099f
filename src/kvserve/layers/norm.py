"""RMSNorm, numerically identical to Hugging Face's LlamaRMSNorm (statistics in float32)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)  # [D]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D], normalised over the last dim.

        Without residual: returns norm(x). With residual: adds it first (in the model dtype, as the
        HF decoder layer does) and returns (norm(x + residual), x + residual), the new residual."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
