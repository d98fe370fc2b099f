"""Quantized linears for Hugging Face folders: int8 / int4 at load, and AWQ / GPTQ checkpoints.

`prepare(model, config, names)` swaps the model's linear layers to blocks before any weight loads
(layers/block_linear.keep_linear_quantized) and returns the transform the checkpoint's tensors go
through on their way to the weight loaders:
- int8 / int4: every decoder linear (not the embedding or LM head); each float weight (or q/k/v,
  gate/up shard) is quantized as it arrives (ops/quant_pack: int8 per output channel as Q8_0, int4
  symmetric in groups of 128 as Q4_0), so the float copy never outlives its tensor;
- AWQ (version gemm) / GPTQ (desc_act off), 4-bit, groups a multiple of 128 (or one per row): the
  modules whose `qweight` the checkpoint holds; their qweight / qzeros / scales are gathered per
  module and become one `<module>.weight` of Q4_Z blocks (value = scale * (q - zero), exact).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.layers.block_linear import keep_linear_quantized
from kvserve.layers.linear import UnquantizedLinearMethod
from kvserve.ops import quant_pack
from kvserve.ops.quant_ops import Q4_Z

logger = logging.getLogger(__name__)

Transform = Callable[[Iterable[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]
_AT_LOAD = {"int8": (quant_pack.Q8_0, quant_pack.quantize_q8_0), "int4": (quant_pack.Q4_0, quant_pack.quantize_q4_0)}
_PARTS = ("qweight", "qzeros", "scales")  # (+ GPTQ's g_idx)
AWQ_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)  # output column j of an int32 sits at bits AWQ_SHIFTS[j] (gemm order)


def prepare(model: nn.Module, config: ModelConfig, names: Iterable[str]) -> Optional[Transform]:
    """Swap the linears config.quantization keeps in blocks; the transform for the checkpoint's
    tensors (None: none needed). names: every tensor name in the checkpoint."""
    if config.quantization in _AT_LOAD:
        qtype, quantize = _AT_LOAD[config.quantization]
        linears = [m for m in model.modules() if isinstance(getattr(m, "linear_method", None), UnquantizedLinearMethod)]
        for module in linears:
            keep_linear_quantized(module, qtype, quantize)
        how = "per output channel (Q8_0)" if qtype == quant_pack.Q8_0 else "symmetric, groups of 128 (Q4_0)"
        logger.info("%s: %d linear weights quantized at load, %s; embeddings and norms in %s",
                    config.quantization, len(linears), how, config.dtype)  # fmt: skip
        return None
    if config.quantization in ("awq", "gptq"):
        quantized = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        modules = _modules_of(model, quantized)
        settings = _settings(config)
        for module in modules.values():
            keep_linear_quantized(module, Q4_Z)
        logger.info("%s: %d linear weights kept as int4 (Q4_Z blocks, group %s); the rest in %s", config.quantization,
                    len(quantized), settings["group_size"], config.dtype)  # fmt: skip
        return lambda weights: _int4_modules(weights, config.quantization, settings)
    return None


def _modules_of(model: nn.Module, checkpoint_modules: set[str]) -> dict[str, nn.Module]:
    """The model's modules (by name) holding the checkpoint's quantized modules; a fused module
    (qkv, gate_up) must have every shard quantized."""
    shards: dict[str, set[str]] = {}
    for name in checkpoint_modules:
        target = name
        for ckpt, (fused, _) in model.packed_modules_mapping.items():
            if name.endswith(f".{ckpt}"):
                target = name[: -len(ckpt)] + fused
        shards.setdefault(target, set()).add(name)
    modules = dict(model.named_modules())
    out = {}
    for target, parts in shards.items():
        module = modules.get(target)
        if module is None or not isinstance(getattr(module, "linear_method", None), UnquantizedLinearMethod):
            raise ValueError(f"quantized checkpoint module {sorted(parts)[0]!r} has no matching linear layer")
        expected = {ckpt for ckpt, (fused, _) in model.packed_modules_mapping.items() if target.endswith(f".{fused}")}
        if expected and len(parts) != len(expected):
            raise ValueError(f"{target}: the checkpoint quantizes {sorted(parts)} but not all of its shards")
        out[target] = module
    return out


def _settings(config: ModelConfig) -> dict:
    """The checked quantization_config of an AWQ / GPTQ checkpoint."""
    q = config.checkpoint_quantization or {}
    method, bits, group = q.get("quant_method"), q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    if bits != 4:
        raise ValueError(f"{method} checkpoint with {bits}-bit weights: kvserve loads 4-bit AWQ / GPTQ only")
    if group is None or (group != -1 and group % 128):
        raise ValueError(f"{method} group_size {group}: kvserve needs a multiple of 128 (or -1, one group per row)")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {q.get('version')!r}: kvserve loads the GEMM packing only")
    if method == "awq" and not q.get("zero_point", True):
        raise ValueError("AWQ without zero points is not supported")
    v1 = method == "gptq" and q.get("checkpoint_format", "gptq") != "gptq_v2"
    return {"group_size": group, "zeros_minus_one": v1}


def _int4_modules(weights: Iterable[tuple[str, torch.Tensor]], method: str, settings: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes plain tensors through; gathers each module's qweight / qzeros / scales (/ g_idx) and
    yields `<module>.weight` as Q4_Z blocks [out, in / 128 * 68] once all have arrived."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, part = name.rpartition(".")
        if part not in (*_PARTS, "g_idx"):
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if all(p in parts for p in _PARTS) and (method == "awq" or "g_idx" in parts):
            yield f"{module}.weight", _to_blocks(pending.pop(module), method, settings, module)
    # GPTQ checkpoints without g_idx: what is left once every tensor has been read
    for module, parts in pending.items():
        if not all(p in parts for p in _PARTS):
            raise ValueError(f"{module}: the checkpoint lacks {sorted(set(_PARTS) - set(parts))}")
        yield f"{module}.weight", _to_blocks(parts, method, settings, module)


def _unpack_columns(packed: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C] holding 8 nibbles each -> int32 [R, 8 C]: column 8 c + j from bits shifts[j]."""
    s = torch.tensor(shifts, dtype=torch.int32)
    return ((packed.to(torch.int32).unsqueeze(-1) >> s) & 15).reshape(packed.shape[0], -1)


def _to_blocks(parts: dict[str, torch.Tensor], method: str, settings: dict, module: str) -> torch.Tensor:
    """One module's AWQ / GPTQ tensors -> Q4_Z blocks [out, in / 128 * 68]."""
    scales = parts["scales"]  # [groups, out] float16
    if method == "awq":
        q = _unpack_columns(parts["qweight"], AWQ_SHIFTS).t()  # [in, out] -> [out, in]
        zeros = _unpack_columns(parts["qzeros"], AWQ_SHIFTS)  # [groups, out]
    else:
        sequential = tuple(range(0, 32, 4))
        q = _unpack_columns(parts["qweight"].t(), sequential)  # [in / 8, out], input 8 i + j at bits 4 j -> [out, in]
        zeros = _unpack_columns(parts["qzeros"], sequential)
        if settings["zeros_minus_one"]:  # GPTQ v1 stores zero - 1 (as AutoGPTQ reads it back: + 1, 4 bits)
            zeros = (zeros + 1) & 15
        g_idx = parts.get("g_idx")
        if g_idx is not None:
            in_features, groups = q.shape[1], scales.shape[0]
            if not torch.equal(g_idx.long(), torch.arange(in_features) // (in_features // groups)):
                raise ValueError(f"{module}: GPTQ with act-order (desc_act) is not supported; quantize with desc_act=False")
    return quant_pack.pack_q4_z(q.contiguous(), scales.t().contiguous(), zeros.t().contiguous())

