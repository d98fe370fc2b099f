"""Weights kept in block types: a GGUF's linear layers, token embedding and LM head as the file has
them, and linears quantized at load (int8 / int4) or from AWQ / GPTQ checkpoints (ops/quant_pack.py).

A kept weight is its GGUF tensor's bytes, unchanged: uint8 [out, row_bytes], each row `in / block_size`
blocks of `type_size` bytes in ggml's layout (q/k rows un-permuted as rows, like dequantized ones), so
the weights take the file's size in memory. How they are multiplied (gguf_matmul):
- decode-sized batches: quant_ops.matmul, blocks unpacked in registers, float32 accumulation;
- larger ones: the weight dequantized exactly (gguf-py's arithmetic) into a reused float32 buffer and
  MKL's GEMM, rounded once: bit for bit F.linear(x.float(), dequantized weight);
- without the kernel library: gguf-py's dequantize (the reference), then the same GEMM.
The embedding dequantizes only the rows it looks up.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from kvserve.layers.linear import LinearMethod, scratch_gemm, scratch_view
from kvserve.ops import quant_ops


def block_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one row of `in_features` values in block type `qtype`."""
    block, size = quant_ops.block_shape(qtype)
    if in_features % block:
        raise ValueError(f"{in_features} input features are not a whole number of {block}-value GGUF blocks")
    return in_features // block * size


def dequantize(blocks: torch.Tensor, qtype: int, k: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blocks uint8 [N, row_bytes] -> float32 [N, k] (into `out` when given), exactly gguf-py's values."""
    w = quant_ops.dequantize(blocks, qtype, k, out=out)
    if w is None:
        w = quant_ops.reference_dequantize(blocks, qtype, k)
        if out is not None:
            w = out.copy_(w)
    return w


def gguf_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: int,
    k: int,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    any_rows: bool = False,
) -> torch.Tensor:
    """x [..., k] @ W^T (+ bias), W the blocks [N, row_bytes] -> [..., N] in out_dtype (default x's).

    any_rows: the block kernel for every batch size (the LM head: dequantizing its 49,152 rows per
    step would cost more than the kernel's compute)."""
    n, out_dtype = blocks.shape[0], out_dtype or x.dtype
    x2 = x.reshape(-1, k)  # [M, k]
    if bias is None and (any_rows or x2.shape[0] <= quant_ops.matmul_max_rows(qtype, k, n)):
        y = quant_ops.matmul(x2.contiguous(), blocks, qtype, k, out_dtype)
        if y is not None:
            return y.view(*x.shape[:-1], n)
    xf = x2 if x2.dtype == torch.float32 else scratch_view("x", x2.shape).copy_(x2)
    wf = dequantize(blocks, qtype, k, out=scratch_view("w", (n, k)))
    return scratch_gemm(xf, wf, bias, out_dtype).view(*x.shape[:-1], n)


class BlockLinearMethod(LinearMethod):
    """weight: uint8 [out_per_partition, row_bytes] in GGUF block type `qtype`; bias [out] in the model dtype."""

    def __init__(self, qtype: int) -> None:
        self.qtype = qtype

    def create_weights(self, layer, in_features, out_features_per_partition, bias, dtype):
        weight = torch.empty(out_features_per_partition, block_bytes(self.qtype, in_features), dtype=torch.uint8)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.in_features = in_features
        b = torch.empty(out_features_per_partition, dtype=dtype) if bias else None
        layer.register_parameter("bias", nn.Parameter(b, requires_grad=False) if bias else None)

    def apply(self, layer, x, bias):
        return gguf_matmul(x, layer.weight, self.qtype, layer.in_features, bias)


def keep_linear_quantized(
    layer: nn.Module, qtype: int, quantize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> None:
    """Swap a parallel linear layer (built unquantized) to blocks of `qtype` before its weights load.
    Its unquantized weight was allocated uninitialised and never touched, so it never took memory.
    quantize: float [rows, in] -> blocks [rows, row_bytes], applied to each float weight (or shard)
    the checkpoint hands it (per-row quantization: the same whether q, k and v come fused or apart)."""
    out_features, in_features = layer.weight.shape
    layer.linear_method = BlockLinearMethod(qtype)
    layer.linear_method.create_weights(layer, in_features, out_features, layer.bias is not None, layer.weight.dtype)
    for param in layer.parameters(recurse=False):
        param.weight_loader = layer.weight_loader
    if quantize is not None:
        load = layer.weight_loader

        def load_quantized(param, loaded_weight, shard_id=None):
            load(param, quantize(loaded_weight) if loaded_weight.is_floating_point() else loaded_weight, shard_id)

        layer.weight.weight_loader = load_quantized


def keep_embedding_quantized(embedding: nn.Module, qtype: int) -> None:
    """The same for a VocabParallelEmbedding (and so the LM head tied to it, or an untied LM head)."""
    rows, dim = embedding.weight.shape
    # out_dtype: what lookups return (the model dtype the weight was built in)
    embedding.quant_type, embedding.embedding_dim, embedding.out_dtype = qtype, dim, embedding.weight.dtype
    weight = torch.empty(rows, block_bytes(qtype, dim), dtype=torch.uint8)
    embedding.weight = nn.Parameter(weight, requires_grad=False)
    embedding.weight.weight_loader = embedding.weight_loader


def embedding_lookup(blocks: torch.Tensor, qtype: int, dim: int, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ids [T] -> [T, dim] in dtype: only the looked-up rows [T, row_bytes] are dequantized."""
    return dequantize(blocks.index_select(0, ids), qtype, dim).to(dtype)
