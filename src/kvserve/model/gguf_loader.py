"""GGUF (llama.cpp) files: model config from the metadata, and tensors renamed to Hugging Face names.

With quantization "gguf" (the default on a CPU with the kernel library) linear layers and embeddings
whose tensors are in a block type the kernels compute with (quant_ops.GGUF_KERNEL_TYPES) keep the
blocks (keep_gguf_blocks, layers/block_linear.py); every other tensor is dequantized to float32 one at
a time and converted to the model dtype. Supported GGUF architectures: llama (also Mistral), qwen2, qwen3.
"""
from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from kvserve.config import ModelConfig
from kvserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvserve.layers.block_linear import keep_embedding_quantized, keep_linear_quantized
from kvserve.layers.linear import LinearMethod
from kvserve.model.gguf_file import GGUFFile
from kvserve.ops import quant_ops

logger = logging.getLogger(__name__)

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF per-layer tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=2)
def read_gguf(path: str) -> GGUFFile:
    """The parsed file, shared by the config, weight and tokenizer loaders (model/gguf_file.py: the
    metadata in ~0.1 s). Tensor data stays memory-mapped, read on access."""
    return GGUFFile(path)


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def _rope_scaling(reader: GGUFFile, arch: str) -> dict[str, Any] | None:
    """The HF-style rope_scaling dict from llama.cpp's `{arch}.rope.scaling.*` keys."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": _field(reader, f"{arch}.rope.scaling.original_context_length"),
        }
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = _field(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")


def gguf_model_config(path: str) -> ModelConfig:
    """ModelConfig from GGUF metadata. dtype fields are "float32" (the dequantized weights)."""
    reader = read_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1 rope scaling as per-frequency factors, not as parameters.
        raise ValueError(f"{path}: GGUF rope_freqs (Llama 3.1 rope scaling) is not supported; use the HF checkpoint")

    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden_size = _field(reader, f"{arch}.embedding_length")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden_size // num_heads)
    rotary_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{path}: partial rotary ({rotary_dim} of {head_dim} dims) is not supported")
    eos_ids = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        path=path,
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"]),
        hidden_size=hidden_size,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{arch}.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=_field(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=_field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_field(reader, f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=_field(reader, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        rope_scaling=_rope_scaling(reader, arch),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        checkpoint_dtype="float32",
        dtype="float32",
    )


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; 'output.weight' -> 'lm_head.weight'."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, name, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[name]}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for Llama (its rotary pairs adjacent dims; HF pairs halves).

    w: [n_head * head_dim, ...] rows of q or k (weight or bias)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, -1).swapaxes(2, 1).reshape(w.shape)


def gguf_tensor_types(path: str) -> dict[str, int]:
    """HF tensor name -> its GGML type code (GGMLQuantizationType), from the metadata alone."""
    return {hf_tensor_name(t.name): int(t.tensor_type) for t in read_gguf(path).tensors}


def keep_gguf_blocks(model: nn.Module, types: dict[str, int]) -> set[str]:
    """Swap the model's linear layers and embeddings whose checkpoint tensors all have one block type
    the kernels take to hold GGUF blocks (before any weight loads); a fused layer (q/k/v, gate/up)
    whose shards differ in type stays unquantized. -> the checkpoint names to load as blocks."""
    shards_of: dict[str, list[str]] = {}  # fused module -> its checkpoint modules
    for ckpt, (fused, _) in model.packed_modules_mapping.items():
        shards_of.setdefault(fused, []).append(ckpt)
    kept: set[str] = set()
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        if isinstance(getattr(module, "linear_method", None), LinearMethod):
            names = [f"{prefix}{ckpt}.weight" for ckpt in shards_of.get(leaf, [leaf])]
        elif isinstance(module, VocabParallelEmbedding) and not (isinstance(module, ParallelLMHead) and module._tied):
            names = [f"{name}.weight"]
        else:
            continue
        qtypes = {types.get(n) for n in names}
        qtype = qtypes.pop() if len(qtypes) == 1 else None
        if qtype not in quant_ops.GGUF_KERNEL_TYPES:
            continue
        if isinstance(module, VocabParallelEmbedding):
            keep_embedding_quantized(module, qtype)
        else:
            keep_linear_quantized(module, qtype)
        kept.update(names)
    return kept


def log_gguf_types(types: dict[str, int], kept: set[str]) -> None:
    """One start-up line: how many tensors are kept in which block type, and which were dequantized."""

    def summary(names) -> str:
        counts = Counter(GGMLQuantizationType(types[n]).name for n in names)
        return ", ".join(f"{t} x {c}" for t, c in counts.most_common()) or "none"

    logger.info("GGUF tensors kept in their blocks: %s; loaded as floats: %s", summary(kept),
                summary(n for n in types if n not in kept))  # fmt: skip


def iter_gguf_weights(
    path: str, config: ModelConfig, blocks: set[str] = frozenset()
) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """-> (number of tensors, iterator of (HF name, tensor)), one tensor in memory at a time: the names in
    `blocks` as their GGUF bytes, uint8 [out, row_bytes]; the others dequantized, float32 [out, in] / [n]."""
    reader = read_gguf(path)
    permuted = _field(reader, "general.architecture") == "llama"  # Qwen GGUFs keep HF's layout

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_tensor_name(t.name)
            if name in blocks:  # rows of blocks: row permutations apply to them as they are
                w = t.data.reshape(t.shape[-1], -1)  # [out, row_bytes] uint8
            else:  # (log_gguf_types names the types dequantized)
                w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))  # [out, in]
            if permuted and ".q_proj." in name:
                w = _unpermute(w, config.num_attention_heads)
            elif permuted and ".k_proj." in name:
                w = _unpermute(w, config.num_key_value_heads)
            # F32 tensors and blocks come back as read-only views of the memory-mapped file: copy those.
            dtype = np.uint8 if name in blocks else np.float32
            yield name, torch.from_numpy(np.require(w, dtype=dtype, requirements=["C", "W"]))

    return len(reader.tensors), tensors()
