"""RMSNorm, numerically identical to Hugging Face's LlamaRMSNorm (statistics in float32).

On a CPU the fused C++ kernel (ops/cpu_ops.rms_norm) runs it when it applies; `_norm` and the
add below are the torch-native reference it is tested against. The kernel rounds at the same
points but sums the squares in another order: a few float32 ulps apart, rarely one bf16 ulp."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvserve.ops import cpu_ops


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
        HF decoder layer does) and returns (norm(x + residual), x + residual), the new residual.
        The fused kernel writes the new residual into `residual` in place: callers pass a residual
        stream they own and use only the returned one afterwards."""
        fused = cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if fused is not None:
            return fused if residual is None else (fused, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
