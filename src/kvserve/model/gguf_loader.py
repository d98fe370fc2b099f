"""GGUF (llama.cpp) files: model config from the metadata, and tensors renamed to Hugging Face names.

Quantized tensors are dequantized to float32 one at a time; the model runs in a float dtype.
Supported GGUF architectures: llama (also Mistral), qwen2, qwen3.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from kvserve.config import ModelConfig

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
def read_gguf(path: str) -> GGUFReader:
    """The parsed file, shared by the config, weight and tokenizer loaders: parsing the metadata
    (the whole vocabulary) takes about 2 s. Tensor data stays memory-mapped, read on access."""
    return GGUFReader(path)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
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
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
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


def iter_gguf_weights(path: str, config: ModelConfig) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """-> (number of tensors, iterator of (HF name, float32 tensor [out, in] / [n])), one tensor in memory at a time."""
    reader = read_gguf(path)
    permuted = _field(reader, "general.architecture") == "llama"  # Qwen GGUFs keep HF's layout

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_tensor_name(t.name)
            w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))  # [out, in]
            if permuted and ".q_proj." in name:
                w = _unpermute(w, config.num_attention_heads)
            elif permuted and ".k_proj." in name:
                w = _unpermute(w, config.num_key_value_heads)
            # F32 tensors come back as read-only views of the memory-mapped file: copy those.
            yield name, torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))

    return len(reader.tensors), tensors()
