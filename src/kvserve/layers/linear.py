"""Linear layers with tensor-parallel shard math and per-parameter weight loaders.

Conventions (as in vLLM):
- Weights are stored [out_features, in_features] like nn.Linear; y = x @ W.T + b.
- Column-parallel layers split the output dim across `tp_size` ranks; row-parallel layers split the
  input dim and sum the partial outputs over ranks (all-reduce). With tp_size == 1 (all we run today)
  every shard is the whole tensor and no collective runs.
- Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)`: given the full
  checkpoint tensor, it copies this rank's shard into the right slice of the (possibly fused) param.
- How the weight is stored and multiplied is a `LinearMethod`, so quantized methods plug in later.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvserve.ops import cpu_ops


class LinearMethod(ABC):
    """How a linear layer's weights are created and applied. Owns the layout of `layer.weight`."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features_per_partition: int, bias: bool, dtype: torch.dtype
    ) -> None:
        """Register `layer.weight` (and `layer.bias` when bias) for this rank's partition.

        in_features is this rank's input size (already divided for row-parallel layers)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features_per_partition]."""

    def process_weights_after_loading(self, layer: nn.Module, keep_decode_copy: bool = False) -> None:
        """Called once after every weight is loaded: repack for the device if that is faster.
        keep_decode_copy: memory allows a second copy of the weight, laid out for the decode kernel."""


class UnquantizedLinearMethod(LinearMethod):
    """Dense weights in the model dtype: weight [out_per_partition, in], bias [out_per_partition].

    On a CPU in bfloat16, with keep_decode_copy (memory allows a second copy), a copy in
    cpu_ops.decode_weight's layout serves decode-sized batches: a kernel that streams it, built for
    every CPU level, measured 1.1-1.45x faster than oneDNN for 1-512 rows with AMX. Larger batches:
    where oneDNN has bf16 kernels (AVX-512 and up) the weight is repacked after loading into its
    blocked layout (an opaque mkldnn tensor), which the matmul otherwise re-derives on every call:
    measured 1.2-2x faster for the decode-sized matmuls of the default model, same speed for
    2,048-row prefill; results equal F.linear's, bit for bit on small batches and to one bf16 ulp
    on larger ones (oneDNN blocks the float32 accumulation differently; tests/unit/test_linear_packing.py)."""

    def create_weights(self, layer, in_features, out_features_per_partition, bias, dtype):
        weight = torch.empty(out_features_per_partition, in_features, dtype=dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        b = torch.empty(out_features_per_partition, dtype=dtype) if bias else None
        layer.register_parameter("bias", nn.Parameter(b, requires_grad=False) if bias else None)

    def process_weights_after_loading(self, layer, keep_decode_copy=False):
        if keep_decode_copy and layer.bias is None:
            layer.decode_weight = cpu_ops.decode_weight(layer.weight)  # None where the kernel does not apply
        packed = pack_for_onednn(layer.weight)
        if packed is not None:
            layer.weight = nn.Parameter(packed, requires_grad=False)

    def apply(self, layer, x, bias):
        decode = getattr(layer, "decode_weight", None)
        if decode is not None and bias is None:
            out = cpu_ops.decode_matmul(x, decode)  # None past the rows it wins at
            if out is not None:
                return out
        if layer.weight.is_mkldnn:
            return onednn_linear(x, layer.weight, bias)
        if float32_gemm_applies(x, layer.weight):
            return float32_gemm(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)


_scratch: dict[str, torch.Tensor] = {}  # grow-only float32 buffers of float32_gemm and gguf_matmul (one engine thread)


def scratch_view(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A float32 [rows, cols] view of the reused buffer `name` (grown as needed); the engine thread's alone."""
    numel = shape[0] * shape[1]
    buf = _scratch.get(name)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
            buf = _scratch[name] = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


def float32_gemm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 on a CPU level without a bf16 dot product (cpu_ops.float32_gemm_preferred)."""
    return weight.dtype == torch.bfloat16 and x.is_cpu and cpu_ops.float32_gemm_preferred()


def float32_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias) on a CPU without a bf16 dot product: x and the weight
    converted to float32 into reused buffers, MKL's float32 GEMM, the result rounded once to
    out_dtype (default x's). Bit for bit F.linear(x.float(), weight.float()).to(out_dtype); no
    float32 copy of the weight is kept (converting it costs 0.5% of a 2,048-row GEMM, 4% at 256)."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    xf = scratch_view("x", (x2.shape[0], k)).copy_(x2)
    wf = scratch_view("w", (n, k)).copy_(weight)
    return scratch_gemm(xf, wf, bias, out_dtype or x.dtype).view(*x.shape[:-1], n)


def scratch_gemm(
    xf: torch.Tensor, wf: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    """xf [M, K] @ wf [N, K]^T (+ bias), both float32: MKL's GEMM into the reused "y" buffer, returned
    as a new [M, N] tensor in out_dtype (rounded once; a copy even in float32, since "y" is reused)."""
    yf = scratch_view("y", (xf.shape[0], wf.shape[0]))
    if bias is None:
        torch.mm(xf, wf.t(), out=yf)
    else:
        torch.addmm(bias.float(), xf, wf.t(), out=yf)
    return yf.to(out_dtype, copy=True)


def pack_for_onednn(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """weight [out, in]: its oneDNN-packed copy (an opaque mkldnn tensor) where that applies (CPU,
    bfloat16, oneDNN with bf16 kernels: cpu_ops.onednn_bf16_preferred), else None."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _onednn_bf16_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [..., in] @ packed weight (from pack_for_onednn) -> [..., out]."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _onednn_bf16_available() -> bool:
    return (
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and cpu_ops.onednn_bf16_preferred()
    )


class _ParallelLinear(nn.Module):
    """Shared construction: creates the weights through the method and attaches the subclass's
    `weight_loader` (which knows how its parameters are sharded and fused) to each parameter."""

    def __init__(
        self,
        in_features: int,
        out_features_per_partition: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        dtype: Optional[torch.dtype],
        linear_method: Optional[LinearMethod],
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(
            self, in_features, out_features_per_partition, bias, dtype or torch.get_default_dtype()
        )
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: parameter slice {tuple(dst.shape)}, checkpoint {tuple(src.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(_ParallelLinear):
    """Output dim split across ranks: this rank holds rows [rank * out_pp, (rank + 1) * out_pp).
    The output stays sharded ([T, out_pp]); the row-parallel layer that follows consumes it."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
        linear_method: Optional[LinearMethod] = None,
    ) -> None:
        assert output_size % tp_size == 0, f"output size {output_size} not divisible by tp_size {tp_size}"
        self.output_size_per_partition = output_size // tp_size
        super().__init__(input_size, self.output_size_per_partition, bias, tp_rank, tp_size, dtype, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        _copy(param.data, loaded_weight.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate_proj and up_proj).

    Param rows: [shard 0 of this rank | shard 1 of this rank | ...]; shard_id is the index into output_sizes."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
        linear_method: Optional[LinearMethod] = None,
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size, dtype, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _copy(param.data.narrow(0, offset, size), loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; shard_id is "q", "k" or "v".

    Query heads are split across ranks. KV heads are split too while tp_size <= num_kv_heads; beyond
    that each KV head is replicated on tp_size // num_kv_heads consecutive ranks.
    Param rows: [q heads of this rank | k heads | v heads], each head head_dim rows."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
        linear_method: Optional[LinearMethod] = None,
    ) -> None:
        assert num_heads % tp_size == 0, f"{num_heads} query heads not divisible by tp_size {tp_size}"
        assert num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0, "kv heads and tp_size must divide"
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)  # ranks sharing one kv head
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_dim
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size, dtype, linear_method)
        self.q_size = self.num_heads * head_dim  # per-rank widths, for splitting the output
        self.kv_size = self.num_kv_heads * head_dim

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id == "q":
            offset, size, rank_index = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank_index = self.kv_size, self.tp_rank // self.kv_replicas
        _copy(param.data.narrow(0, offset, size), loaded_weight.narrow(0, rank_index * size, size))


class RowParallelLinear(_ParallelLinear):
    """Input dim split across ranks: this rank holds columns [rank * in_pp, (rank + 1) * in_pp) and
    gets a sharded input [T, in_pp]. Partial outputs are summed over ranks; the bias is added once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
        linear_method: Optional[LinearMethod] = None,
    ) -> None:
        assert input_size % tp_size == 0, f"input size {input_size} not divisible by tp_size {tp_size}"
        self.input_size_per_partition = input_size // tp_size
        super().__init__(self.input_size_per_partition, output_size, bias, tp_rank, tp_size, dtype, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: not sharded
            _copy(param.data, loaded_weight)
            return
        size = param.shape[1]
        _copy(param.data, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, x, self.bias if self.tp_rank == 0 else None)  # [T, out]
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
