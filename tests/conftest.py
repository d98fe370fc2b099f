"""Shared fixtures. The tiny model is a random-weight Llama the suite builds itself, with the default
model's tokenizer (so text round-trips), saved as an HF folder; nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_llama(folder: Path, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> str:
    """Write the tiny model (config, seeded weights, the default model's tokenizer) into folder.
    Also used by benchmarks/gpu_check.py, which runs it on a GPU."""
    import safetensors.torch
    import torch

    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.model.config_loader import default_model_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(default_model_path())
    vocab, inter, layers = len(tok), 128, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
        "torch_dtype": "float32", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def w(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
        })  # fmt: skip
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template})
    )
    return str(folder)


def build_tiny_gguf(path: Path, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> str:
    """Write a tiny Llama GGUF with seeded random weights kept in block types: embedding Q8_0, q/k/v
    and gate/up Q4_0, o Q4_1, down Q8_0 (norms F32). It carries no tokenizer beyond a vocabulary
    size: load it with the default model's tokenizer (EngineArgs(tokenizer=default_model_path()))."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, GGUFWriter
    from gguf.quants import quantize

    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.model.config_loader import default_model_path

    vocab, inter, layers, head_dim = len(load_tokenizer(default_model_path())), 128, 2, hidden // heads
    gen = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name: str, shape: tuple[int, ...], qtype=None, std: float = 0.3) -> None:
        w = (gen.standard_normal(shape) * std).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, quantize(w, qtype), raw_shape=None, raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), T.Q8_0, std=1.0)
    add("output_norm.weight", (hidden,), std=0.1)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (hidden,), std=0.1)
        add(p + "ffn_norm.weight", (hidden,), std=0.1)
        add(p + "attn_q.weight", (heads * head_dim, hidden), T.Q4_0)
        add(p + "attn_k.weight", (kv_heads * head_dim, hidden), T.Q4_0)
        add(p + "attn_v.weight", (kv_heads * head_dim, hidden), T.Q4_0)
        add(p + "attn_output.weight", (hidden, heads * head_dim), T.Q4_1)
        add(p + "ffn_gate.weight", (inter, hidden), T.Q4_0)
        add(p + "ffn_up.weight", (inter, hidden), T.Q4_0)
        add(p + "ffn_down.weight", (hidden, inter), T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """One engine over the tiny model, shared by tests that do not depend on engine settings."""
    from kvserve import LLM

    return LLM(tiny_llama_dir, dtype="float32", kv_cache_memory_bytes=64 << 20, max_num_seqs=32)
