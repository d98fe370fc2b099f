"""Python entry points of the GPU's fused Triton ops (ops/triton_ops.py), and which of them are on.

Like ops/cpu_ops.py, each function returns None (or False) when its kernel does not apply (the op
is off, triton does not import, not a GPU tensor, an unsupported dtype or layout); the layer then
runs its torch-native reference. Which ops are on is vLLM's `compilation_config.custom_ops`
(config.CompilationConfig.custom_ops), set once per engine by the model runner through
`configure`: "all" / "none", then "+name" / "-name" for rms_norm, silu_and_mul, rotary_embedding.
They touch only CUDA / ROCm tensors; a CPU's kernels follow KVSERVE_CPU_ISA instead.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CUSTOM_OPS = ("rms_norm", "silu_and_mul", "rotary_embedding")
_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes whose rounding points the kernels follow

_enabled: frozenset[str] = frozenset()  # set by configure(); nothing runs before an engine says so
_device_type = "cuda"  # the tensors the kernels take; tests set "cpu" to run them under the interpreter


def resolve_custom_ops(custom_ops: tuple[str, ...]) -> frozenset[str]:
    """vLLM's custom_ops list -> the ops on. From every op on (vLLM's default without its inductor
    compile, which we do not run), entries apply in order: "all" / "none" set every op, "+name" /
    "-name" one. Raises ValueError naming the entry and the choices."""
    on = set(CUSTOM_OPS)
    for entry in custom_ops:
        if entry in ("all", "none"):
            on = set(CUSTOM_OPS) if entry == "all" else set()
        elif entry[:1] in "+-" and entry[1:] in CUSTOM_OPS:
            (on.add if entry[0] == "+" else on.discard)(entry[1:])
        else:
            raise ValueError(
                f"compilation_config custom_ops entry {entry!r} is not understood: use 'all', 'none', "
                f"or '+' / '-' and one of {', '.join(CUSTOM_OPS)}"
            )
    return frozenset(on)


@functools.cache
def _triton_ops():
    """ops/triton_ops, or None where triton does not import (the references run then)."""
    try:
        from kvserve.ops import triton_ops
    except ImportError as error:  # pragma: no cover - depends on the install
        logger.warning("triton does not import (%s): the GPU runs the torch-native norms, rotary and SiLU", error)
        return None
    return triton_ops


def configure(custom_ops: tuple[str, ...], device: str) -> frozenset[str]:
    """Turn the fused ops on for an engine on `device` (a GPU; off elsewhere). Returns those on."""
    global _enabled
    on = resolve_custom_ops(custom_ops)
    _enabled = on if torch.device(device).type == _device_type and _triton_ops() is not None else frozenset()
    if _enabled:
        logger.info("fused Triton ops: %s", ", ".join(sorted(_enabled)))
    return _enabled


def _applies(op: str, *tensors: torch.Tensor) -> bool:
    if op not in _enabled:
        return False
    dtype = tensors[0].dtype
    return dtype in _DTYPES and all(t.device.type == _device_type and t.dtype == dtype for t in tensors)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """As layers/norm.RMSNorm.forward: x [T, D] or [T, H, D] (last dim contiguous) -> norm(x) * weight;
    with residual ([T, D] float32, contiguous), residual += x in place and the norm of the sum."""
    if not _applies("rms_norm", x, weight) or x.dim() not in (2, 3) or x.stride(-1) != 1:
        return None
    if x.dim() == 3 and x.stride(1) != x.shape[2]:
        return None
    if residual is not None and (
        residual.dim() != 2 or residual.shape != x.shape or residual.dtype != torch.float32
        or residual.device != x.device or not residual.is_contiguous()
    ):  # fmt: skip
        return None
    return _triton_ops().rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]."""
    if not _applies("silu_and_mul", x) or x.dim() != 2 or x.stride(1) != 1:
        return None
    return _triton_ops().silu_and_mul(x)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int) -> bool:
    """Rotate q [T, Hq * D] and k [T, Hkv * D] in place (rows may be strided views of one qkv
    tensor); cos_sin: [T, D] float32. False (nothing done) when the kernel does not apply."""
    if not _applies("rotary_embedding", q, k) or q.dim() != 2 or k.dim() != 2:
        return False
    if q.stride(1) != 1 or k.stride(1) != 1 or q.shape[0] != cos_sin.shape[0]:
        return False
    if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous() or cos_sin.device != q.device:
        return False
    _triton_ops().rotary_(q, k, cos_sin, head_dim)
    return True
