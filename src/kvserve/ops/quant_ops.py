"""Python entry points of the GGUF block kernels (csrc/quant.cpp): weights kept in their GGUF block
types, as the file stores them ([N, row_bytes] uint8, each row K / block_size blocks).

Each kernel function returns None where the kernel does not apply (no library, not a CPU tensor, an
unsupported dtype, layout or block type); the caller then runs the reference: reference_dequantize
(gguf-py's numpy arithmetic, which the kernel's dequantize equals bit for bit) and a float32 matmul.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kvserve.ops import cpu_build

# GGML type ids the kernels compute with: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K.
GGUF_KERNEL_TYPES = frozenset({2, 3, 8, 12, 13, 14})
# kvserve's own block type, not a GGML one (quant_pack.py makes it): AWQ / GPTQ int4, group 128, with
# a float16 scale and an integer zero point per group (csrc/quant_blocks.hpp's Q4_Z).
Q4_Z = 100
KERNEL_TYPES = GGUF_KERNEL_TYPES | {Q4_Z}
_OWN_SIZES = {Q4_Z: (128, 68)}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def block_shape(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of block type `qtype` (GGML's, or Q4_Z)."""
    return _OWN_SIZES[qtype] if qtype in _OWN_SIZES else GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def _row_bytes(qtype: int, k: int) -> Optional[int]:
    """Bytes of one row of k values, None where k is not a whole number of blocks."""
    block, size = block_shape(qtype)
    return k // block * size if k > 0 and k % block == 0 else None


def _blocks_fit(blocks: torch.Tensor, qtype: int, k: int) -> bool:
    """The kernels apply to these blocks: a supported type, CPU uint8 [N, row_bytes] contiguous, library loaded."""
    if qtype not in KERNEL_TYPES or blocks.dim() != 2 or blocks.dtype != torch.uint8:
        return False
    if not blocks.is_cpu or not blocks.is_contiguous() or blocks.shape[1] != _row_bytes(qtype, k):
        return False
    return cpu_build.load() is not None


def dequantize(
    blocks: torch.Tensor, qtype: int, k: int, out: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """blocks uint8 [N, row_bytes] -> float32 [N, k], bit for bit gguf-py's dequantize; into `out`
    where it is a contiguous float32 CPU tensor of that shape (else a new one)."""
    if not _blocks_fit(blocks, qtype, k):
        return None
    n = blocks.shape[0]
    if out is None or out.shape != (n, k) or out.dtype != torch.float32 or not out.is_cpu or not out.is_contiguous():
        out = torch.empty(n, k, dtype=torch.float32)
    cpu_build.load().kv_quant_dequant(int(qtype), blocks.data_ptr(), n, k, out.data_ptr())
    return out


def matmul(
    x: torch.Tensor, blocks: torch.Tensor, qtype: int, k: int, out_dtype: Optional[torch.dtype] = None
) -> Optional[torch.Tensor]:
    """x [M, k] (float32 or bfloat16, contiguous) @ W^T -> [M, N] in out_dtype (float32 or bfloat16;
    default x's), W the blocks [N, row_bytes]: each weight decoded exactly (as dequantize) in
    registers, float32 sums, rounded once. Any M; it beats dequantize + GEMM up to matmul_max_rows."""
    out_dtype = out_dtype or x.dtype
    if x.dim() != 2 or x.dtype not in _DTYPE_CODE or out_dtype not in _DTYPE_CODE or x.shape[1] != k:
        return None
    if not x.is_cpu or not x.is_contiguous() or x.shape[0] == 0 or not _blocks_fit(blocks, qtype, k):
        return None
    m, n = x.shape[0], blocks.shape[0]
    out = torch.empty(m, n, dtype=out_dtype)
    cpu_build.load().kv_quant_matmul(
        int(qtype), x.data_ptr(), _DTYPE_CODE[x.dtype], m, k, blocks.data_ptr(), n, out.data_ptr(),
        _DTYPE_CODE[out_dtype],
    )  # fmt: skip
    return out


def matmul_max_rows(qtype: int, k: int, n: int) -> int:
    """Rows up to which matmul beats dequantize + the library GEMM at this CPU level (measured,
    vec*.hpp); 0 where the kernel does not apply (no library, type, k not whole blocks)."""
    return _max_rows(int(qtype), k, n) if cpu_build.load() is not None else 0


@functools.lru_cache(maxsize=None)  # asked on every linear call; fixed for the process
def _max_rows(qtype: int, k: int, n: int) -> int:
    return cpu_build.load().kv_quant_matmul_max_rows(qtype, k, n)


def reference_dequantize(blocks: Union[torch.Tensor, np.ndarray], qtype: int, k: int) -> torch.Tensor:
    """gguf-py's dequantize (numpy, no kernels): blocks uint8 [N, row_bytes] -> float32 [N, k]; for
    Q4_Z, quant_pack's torch arithmetic."""
    if qtype == Q4_Z:
        from kvserve.ops.quant_pack import dequantize_q4_z

        return dequantize_q4_z(torch.as_tensor(blocks), k)
    array = blocks.cpu().numpy() if isinstance(blocks, torch.Tensor) else np.asarray(blocks)
    values = gguf_dequantize(np.ascontiguousarray(array, dtype=np.uint8), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(array.shape[0], k)
