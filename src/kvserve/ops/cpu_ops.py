"""Python entry points of the CPU kernels (csrc/cpu_kernels.cpp), with the rules for when they apply.

Each function returns None when its kernel does not apply (no library, not a CPU tensor, an
unsupported dtype or layout); the caller then runs its torch-native reference. Tensors are
passed by data pointer, so every argument is checked for dtype, device and contiguity here.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from kvserve.ops import cpu_build

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def _code(*tensors: torch.Tensor) -> Optional[int]:
    """dtype code if the library is loaded and all tensors are CPU tensors of one supported dtype.
    Asked ~300 times per step: `is_cpu` and a plain loop, 0.45 vs 1.7 us with `device.type` and any()."""
    dtype = tensors[0].dtype
    if not tensors[0].is_cpu or dtype not in _DTYPE_CODE or cpu_build.load() is None:  # (no build for GPU tensors)
        return None
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype:
            return None
    return _DTYPE_CODE[dtype]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """x: [T, D] -> norm(x) * weight in x's dtype; with residual ([T, D] float32, whatever x's dtype),
    residual += x (in place, unrounded) and norm(residual) * weight."""
    code = _code(x, weight)
    if code is None or x.dim() != 2 or not x.is_contiguous() or not weight.is_contiguous():
        return None
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != torch.float32 or not residual.is_cpu
        or not residual.is_contiguous()
    ):  # fmt: skip
        return None
    out = torch.empty_like(x)
    res_ptr = residual.data_ptr() if residual is not None else None
    cpu_build.load().kv_rms_norm(code, x.data_ptr(), res_ptr, out.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def silu_and_mul(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]."""
    code = _code(x)
    if code is None or x.dim() != 2 or not x.is_contiguous():
        return None
    out = x.new_empty(x.shape[0], x.shape[1] // 2)
    cpu_build.load().kv_silu_and_mul(code, x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1] // 2)
    return out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int) -> bool:
    """Rotate q [T, Hq * D] and k [T, Hkv * D] in place (rows may be strided views of one qkv tensor).
    cos_sin: [T, D] float32. Returns False (nothing done) when the kernel does not apply."""
    code = _code(q, k)
    if code is None or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        return False
    if q.stride(1) != 1 or k.stride(1) != 1 or q.shape[0] != cos_sin.shape[0]:
        return False
    cpu_build.load().kv_rotary(
        code, q.data_ptr(), k.data_ptr(), cos_sin.data_ptr(), q.shape[0], q.shape[1] // head_dim,
        k.shape[1] // head_dim, head_dim, q.stride(0), k.stride(0),
    )  # fmt: skip
    return True


def kv_halves(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of kv_cache[0] (keys) and kv_cache[1] (values) of a contiguous [2, ...] cache,
    without making the two views (a few us each, on every layer of every step)."""
    base = kv_cache.data_ptr()
    return base, base + kv_cache.stride(0) * kv_cache.element_size()


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """k, v: [T, Hkv, D] (rows may be strided views of the qkv output) -> slots slot_mapping [T] of
    kv_cache [2, num_blocks, block_size, Hkv, D]. False (nothing written) when the kernel does not apply."""
    code = _code(k, v, kv_cache)
    if code is None or not kv_cache.is_contiguous() or k.shape != v.shape or k.shape[1:] != kv_cache.shape[3:]:
        return False
    row = k.shape[1] * k.shape[2]
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            return False
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_cpu or not slot_mapping.is_contiguous():
        return False
    cpu_build.load().kv_write_kv(
        code, k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), *kv_halves(kv_cache),
        slot_mapping.data_ptr(), k.shape[0], row,
    )  # fmt: skip
    return True


def argmax_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x: [N, V] (rows may be strided, e.g. a vocab slice) -> [N] int64, first index of each row's max."""
    code = _code(x)
    if code is None or x.dim() != 2 or x.stride(1) != 1:
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    cpu_build.load().kv_argmax_rows(code, x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0))
    return out


def sample_rows(x: torch.Tensor, inv_temperature: torch.Tensor, uniforms: torch.Tensor) -> Optional[torch.Tensor]:
    """x: [N, V] logits (rows may be strided); inv_temperature: [N] float32 (0 = greedy row);
    uniforms: [N] float64 in [0, 1) -> [N] int64, one inverse-CDF draw per row from
    softmax(x * inv_temperature) (reference: worker/sampler.py inverse_cdf_sample)."""
    code = _code(x)
    if code is None or x.dim() != 2 or x.stride(1) != 1:
        return None
    if inv_temperature.dtype != torch.float32 or uniforms.dtype != torch.float64:
        return None
    for t in (inv_temperature, uniforms):
        if not t.is_cpu or not t.is_contiguous() or t.shape != x.shape[:1]:
            return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    cpu_build.load().kv_sample_rows(
        code, x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
        inv_temperature.data_ptr(), uniforms.data_ptr(),
    )  # fmt: skip
    return out


def decode_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """weight [N, K] (nn.Linear layout) rearranged for decode_matmul: [N / 16, K / 2, 16, 2], block b,
    pair p, column j holding weight[16b + j, 2p : 2p + 2]. None where the kernel does not apply
    (not bf16 on CPU, no kernels loaded, K % 32 or N % 16 not 0)."""
    if _code(weight) != 1 or weight.dim() != 2:
        return None
    n, k = weight.shape
    if decode_matmul_max_rows(k, n) == 0:
        return None
    return weight.detach().reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def decode_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    allow_amx: bool = True,
    out_dtype: torch.dtype = torch.bfloat16,
    out: Optional[torch.Tensor] = None,
    any_rows: bool = False,
) -> Optional[torch.Tensor]:
    """x: [M, K] @ W^T -> [M, N], weight being W in decode_weight's layout. For decode-sized batches,
    where streaming the weight bounds the matmul; None when M is past the rows this CPU's kernel
    wins at (decode_matmul_max_rows; any_rows: any M, for the float32 logits of the LM head) or x
    does not fit (then the caller's matmul runs).
    out_dtype: bfloat16, or float32 for the float32 sums unrounded. out: a contiguous [M, N] tensor
    of out_dtype to write into (and return) instead of a new one; other shapes are not used.
    allow_amx=False: the vector kernel even where AMX is usable (for tests)."""
    if x.dim() != 2 or weight.dim() != 4 or _code(x, weight) != 1 or not x.is_contiguous():
        return None
    m, k = x.shape
    n = weight.shape[0] * 16
    limit = decode_matmul_max_rows(k, n, allow_amx)
    if k != weight.shape[1] * 2 or limit == 0 or not (0 < m <= limit or (any_rows and m > 0)):
        return None
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"decode_matmul writes bfloat16 or float32, not {out_dtype}")
    if out is None or out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() or not out.is_cpu:
        out = x.new_empty(m, n, dtype=out_dtype)
    cpu_build.load().kv_decode_matmul_bf16(
        x.data_ptr(), m, k, weight.data_ptr(), n, out.data_ptr(), int(allow_amx), int(out_dtype == torch.float32)
    )
    return out


@functools.lru_cache(maxsize=None)  # asked on every linear call; fixed for the process
def decode_matmul_max_rows(k: int, n: int, allow_amx: bool = True) -> int:
    """Rows up to which decode_matmul runs for a [n, k] weight: the kernel's measured crossover with
    the library matmul at this CPU level (512 with AMX); 0 where it does not apply."""
    lib = cpu_build.load()
    return lib.kv_decode_matmul_max_rows(k, n, int(allow_amx)) if lib is not None else 0


@functools.lru_cache(maxsize=None)
def amx_in_use() -> bool:
    """The kernels run AMX tiles: the amx level, and the OS granted them to this process."""
    lib = cpu_build.load()
    return lib is not None and bool(lib.kv_amx_granted())


# Levels without a bf16 dot product: there a bf16 matmul past the decode kernel's rows is fastest as
# bf16 -> float32 conversion and MKL's float32 GEMM (layers/linear.py: float32_gemm). Measured on
# the default model's linears, 2,048-row step, 30 layers: AVX2 (emulated) 23.2 s with torch's bf16
# matmul -> 3.3 s; AVX-512 without BF16 8.4 s with oneDNN's packed bf16 -> 1.96 s.
_FLOAT32_GEMM_LEVELS = ("avx2", "avx512", "neon")


@functools.lru_cache(maxsize=None)  # asked on every linear call; fixed for the process
def float32_gemm_preferred() -> bool:
    """Whether bf16 matmuls past the decode kernel's rows go through float32 GEMM (see above)."""
    return cpu_build.level() in _FLOAT32_GEMM_LEVELS


@functools.lru_cache(maxsize=None)
def onednn_bf16_preferred() -> bool:
    """Whether bf16 matmuls past the decode kernel's rows go to oneDNN's packed bf16 kernels: on
    the levels with a bf16 dot product (AVX512_BF16, AMX), or without CPU kernels where oneDNN has
    bf16 kernels (torch says so)."""
    if cpu_build.level() in _FLOAT32_GEMM_LEVELS:
        return False
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    out: torch.Tensor,  # [T, Hq, D], rows of the listed requests are written
    block_tables: torch.Tensor,  # [B, W] int64
    seq_lens: torch.Tensor,  # [B] int64
    query_start_loc: torch.Tensor,  # [B + 1] int64
    reqs: torch.Tensor,  # [n] int64: which requests to compute
    scale: float,
    skip_blocks: int = 0,
    init_out: Optional[torch.Tensor] = None,  # [T, Hq, D] q.dtype: attention over blocks < skip_blocks
    init_lse: Optional[torch.Tensor] = None,  # [T, Hq] float32: its log-sum-exp of scaled scores
) -> bool:
    """Causal attention of the listed requests' query rows over their paged context, read in place.
    With skip_blocks > 0 (cascade), each row continues from (init_out, init_lse) instead of reading
    the first skip_blocks blocks of its table."""
    code = _code(q, kv_cache, out)
    if code is None or not (q.is_contiguous() and kv_cache.is_contiguous() and out.is_contiguous()):
        return False
    index = (block_tables, seq_lens, query_start_loc, reqs)
    if any(t.dtype != torch.int64 or not t.is_contiguous() or not t.is_cpu for t in index):
        return False
    if skip_blocks:
        if init_out is None or init_lse is None or init_out.shape != q.shape or init_out.dtype != q.dtype:
            return False
        if init_lse.dtype != torch.float32 or init_lse.shape != q.shape[:2]:
            return False
        if not (init_out.is_contiguous() and init_lse.is_contiguous()):
            return False
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    cpu_build.load().kv_paged_attention(
        code, q.data_ptr(), *kv_halves(kv_cache), out.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), query_start_loc.data_ptr(),
        reqs.data_ptr(), reqs.numel(), q.shape[1], num_kv_heads, head_dim, block_size, scale, skip_blocks,
        init_out.data_ptr() if skip_blocks else None, init_lse.data_ptr() if skip_blocks else None,
    )  # fmt: skip
    return True


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D], rows may be strided (views of one qkv tensor)
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    out: torch.Tensor,  # [T, Hq, D] contiguous: the prompts' rows are written
    starts: torch.Tensor,  # [P] int64: each prompt's first row
    lens: torch.Tensor,  # [P] int64: its length (its keys are exactly its rows: nothing cached)
    scale: float,
) -> bool:
    """Causal attention of fresh prompts over their own keys (AMX kernel, bfloat16). Returns False,
    doing nothing, where the kernel does not apply; the caller then runs SDPA, its reference."""
    if _code(q, k, v, out) != 1 or not out.is_contiguous() or q.dim() != 3 or out.shape != q.shape:
        return False
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != q.shape[0]:
        return False
    if any(t.stride(2) != 1 or t.stride(1) != t.shape[2] for t in (q, k, v)):
        return False
    if any(t.dtype != torch.int64 or not t.is_contiguous() or not t.is_cpu for t in (starts, lens)):
        return False
    if starts.numel() and int((starts + lens).max()) > q.shape[0]:
        return False
    _, num_heads, head_dim = q.shape
    return bool(
        cpu_build.load().kv_prefill_attention_bf16(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(), lens.data_ptr(),
            starts.numel(), num_heads, k.shape[1], head_dim, q.stride(0), k.stride(0), v.stride(0), scale,
        )  # fmt: skip
    )


def prefix_attention(
    q: torch.Tensor,  # [T, Hq, D], rows may be strided
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    first_block: int,
    num_blocks: int,
    out: torch.Tensor,  # [T, Hq, D] contiguous, q's dtype
    lse: torch.Tensor,  # [T, Hq] float32 contiguous
    scale: float,
) -> bool:
    """Every row of q over all keys of the cache blocks first_block .. + num_blocks (consecutive: a
    cascade's shared prefix, read in place), none masked: out <- attention output, lse <- the
    natural-log sum of exp of each row's scaled scores (AMX kernel, bfloat16; P rounded to bf16 for
    the PV multiply, as torch's CPU flash attention). Returns False, doing nothing, where the kernel
    does not apply; the caller then runs SDPA, its reference."""
    if _code(q, kv_cache, out) != 1 or q.dim() != 3 or out.shape != q.shape or not out.is_contiguous():
        return False
    if q.stride(2) != 1 or q.stride(1) != q.shape[2] or not kv_cache.is_contiguous():
        return False
    if lse.dtype != torch.float32 or lse.shape != q.shape[:2] or not lse.is_contiguous() or not lse.is_cpu:
        return False
    _, total, block_size, num_kv_heads, head_dim = kv_cache.shape
    if q.shape[2] != head_dim or not (0 <= first_block and num_blocks > 0 and first_block + num_blocks <= total):
        return False
    keys, values = kv_halves(kv_cache)
    offset = first_block * block_size * num_kv_heads * head_dim * kv_cache.element_size()
    return bool(
        cpu_build.load().kv_prefix_attention_bf16(
            q.data_ptr(), keys + offset, values + offset, out.data_ptr(), lse.data_ptr(), q.shape[0],
            num_blocks * block_size, q.shape[1], num_kv_heads, head_dim, q.stride(0), num_kv_heads * head_dim, scale,
        )  # fmt: skip
    )
