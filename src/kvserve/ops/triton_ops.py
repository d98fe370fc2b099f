"""Triton kernels for the GPU's small per-token ops: add + RMSNorm, rotary in place, SiLU-and-mul.

Each is one launch where the torch-native references (layers/norm.py, rotary.py, activation.py)
take 3 to 9: on a GPU those ops are bound by launches and by re-reading their [T, D] inputs, not by
arithmetic. Each kernel rounds at the reference's points (bfloat16 after every op the reference
does in bfloat16; the residual stream float32), so in float32 they differ from it only by the
order of the sum of squares and by fused multiply-adds, a few ulps. Written once, they run on CUDA
and ROCm, and under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) on a
CPU, where the tests compare them with the references. ops/gpu_ops.py decides when they apply.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    """Warps for one program over `block` elements: ~256 elements per warp, 1 to 8."""
    return max(1, min(8, block // 256))


@triton.jit
def _round(x, BF16: tl.constexpr):
    """float32 x -> the nearest bfloat16 (ties to even) as float32 with BF16, else x. In integers, so
    that Triton's interpreter, whose float32 -> bfloat16 cast truncates, rounds as GPUs do; the
    `.to(bfloat16)` after it is then exact everywhere. (NaN payloads aside.)"""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,  # x rows; residual [R, D] float32 (in place); weight [D]; out [R, D]
    heads, stride_xt, stride_xh, eps,  # row r = (r // heads, r % heads) of x viewed [T, heads, D]
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, BF16: tl.constexpr,  # BF16: weight's dtype
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + (r // heads) * stride_xt + (r % heads) * stride_xh + offs, mask=ok, other=0.0)
    h = x.to(tl.float32)
    if HAS_RES:  # residual += x, unrounded; the norm reads the sum
        h += tl.load(res_ptr + r * D + offs, mask=ok, other=0.0)
        tl.store(res_ptr + r * D + offs, h, mask=ok)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    # Reference: weight * (h * rsqrt(var + eps)).to(dtype), the product in the weight's dtype.
    n = _round(h * inv, BF16)
    tl.store(out_ptr + r * D + offs, _round(w.to(tl.float32) * n, BF16).to(w.dtype), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x: [T, D] or [T, H, D] (the last dim contiguous; rows strided, as q and k are in qkv) ->
    norm * weight, contiguous, in the weight's dtype. With residual ([T, D] float32, contiguous):
    residual += x in place and the norm of the sum."""
    d = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    stride_h = x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    rows = x.numel() // d
    if rows:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, heads, x.stride(0), stride_h, eps,
            D=d, BLOCK=block, HAS_RES=residual is not None, BF16=weight.dtype == torch.bfloat16,
            num_warps=_warps(block),
        )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    gate = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0)
    up = tl.load(x_ptr + t * stride_x + I + offs, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), BF16)  # F.silu: computed in float32, rounded once
    tl.store(out_ptr + t * I + offs, _round(silu * up.to(tl.float32), BF16).to(gate.dtype), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] (rows strided, each contiguous) -> silu(gate) * up: [T, I] contiguous."""
    t, i = x.shape[0], x.shape[1] // 2
    out = x.new_empty(t, i)
    if t:
        block = min(1024, triton.next_power_of_2(i))
        _silu_and_mul_kernel[(t, triton.cdiv(i, block))](
            x, out, x.stride(0), I=i, BLOCK=block, BF16=x.dtype == torch.bfloat16, num_warps=_warps(block)
        )
    return out


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_sin_ptr,  # q [T, HQ * D], k [T, HKV * D] rotated in place; cos_sin [T, D] float32
    stride_q, stride_k,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr,  # BLOCK: pow2 >= D / 2
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # heads 0 .. HQ - 1 of q, then those of k
    if h < HQ:
        base = q_ptr + t * stride_q + h * D
    else:
        base = k_ptr + t * stride_k + (h - HQ) * D
    offs = tl.arange(0, BLOCK)
    ok = offs < D // 2
    x1 = tl.load(base + offs, mask=ok, other=0.0)
    x2 = tl.load(base + D // 2 + offs, mask=ok, other=0.0)
    # Reference (HF): cos and sin cast to x's dtype, then every product and sum in that dtype.
    cos = _round(tl.load(cos_sin_ptr + t * D + offs, mask=ok, other=0.0), BF16)
    sin = _round(tl.load(cos_sin_ptr + t * D + D // 2 + offs, mask=ok, other=0.0), BF16)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = _round(_round(a1 * cos, BF16) - _round(a2 * sin, BF16), BF16)
    o2 = _round(_round(a2 * cos, BF16) + _round(a1 * sin, BF16), BF16)
    tl.store(base + offs, o1.to(x1.dtype), mask=ok)
    tl.store(base + D // 2 + offs, o2.to(x1.dtype), mask=ok)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int) -> None:
    """Rotate q [T, Hq * D] and k [T, Hkv * D] (rows strided, each contiguous) in place, neox
    layout (halves rotated pairwise); cos_sin: [T, D] float32 contiguous (cos | sin)."""
    t = q.shape[0]
    hq, hkv = q.shape[1] // head_dim, k.shape[1] // head_dim
    if t:
        _rotary_kernel[(t, hq + hkv)](
            q, k, cos_sin, q.stride(0), k.stride(0), HQ=hq, D=head_dim, BLOCK=triton.next_power_of_2(head_dim // 2),
            BF16=q.dtype == torch.bfloat16,
        )  # fmt: skip
