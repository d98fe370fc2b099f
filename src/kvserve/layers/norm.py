"""RMSNorm, numerically Hugging Face's LlamaRMSNorm (statistics in float32), with the residual add fused.

The residual stream it adds into is float32 whatever the model dtype: Hugging Face rounds it to
bfloat16 after every add in a bfloat16 model, and on the default model that rounding alone is what
makes bfloat16 greedy decoding leave float32's (measured: bf16 weights with float32 activations
agree with float32 on all 8 exactness prompts for 16 tokens; rounding only the residual stream,
4 of 8). In a float32 model this is exactly Hugging Face's math.

On a CPU the fused C++ kernel (ops/cpu_ops.rms_norm) runs it when it applies, on a GPU the Triton
kernel (ops/gpu_ops.rms_norm); `_norm` and the add below are the torch-native reference they are
tested against. The kernels round at the same points but sum the squares in another order: a few
float32 ulps apart, rarely one bf16 ulp."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvserve.ops import cpu_ops, gpu_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)  # [D]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] in any float dtype -> [..., D] in the weight's (the model's) dtype."""
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D] in the model dtype, normalised over the last dim.

        Without residual: returns norm(x). With residual (float32, same shape): adds x to it in
        float32 and returns (norm(x + residual), x + residual), the new residual. The fused kernel
        writes the new residual into `residual` in place: callers pass a residual stream they own
        and use only the returned one afterwards."""
        fused = cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if fused is None:
            fused = gpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if fused is not None:
            return fused if residual is None else (fused, residual)
        if residual is None:
            return self._norm(x)
        residual = x.float() + residual
        return self._norm(residual), residual
