"""Random-weight Hugging Face folders in real models' shapes, for the device check (gpu_check.py):
nothing is downloaded, the GPU machine has no network."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# The real models' config.json values (Qwen2 has q/k/v biases); the weights are random.
SHAPES = {
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
        "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    },
}  # fmt: skip


def build_model(folder: Path, shape: str, layers: int, device: str, seed: int = 0) -> dict:
    """An HF folder: config.json, seeded bf16 weights scaled like trained ones (std 0.02, norms ~1;
    the final norm ~6 gives logits of std ~3, as a trained model's: at 1 they are nearly flat and
    near-ties would make greedy comparisons a coin toss), a word-level tokenizer over the vocab.
    Returns the config."""
    import safetensors.torch

    cfg = {**SHAPES[shape], "num_hidden_layers": layers, "tie_word_embeddings": True, "hidden_act": "silu",
           "torch_dtype": "bfloat16"}  # fmt: skip  (no eos: both engines generate every token asked for)
    h, inter, heads, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads"))  # fmt: skip
    d = h // heads
    g = torch.Generator(device).manual_seed(seed)

    def w(*dims, mean=0.0, std=0.02):
        return (torch.randn(*dims, generator=g, device=device) * std + mean).to(torch.bfloat16).cpu()

    linears = {
        "self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h), "self_attn.v_proj": (kv * d, h),
        "self_attn.o_proj": (h, heads * d),
        "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter),
    }  # fmt: skip
    biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if cfg["model_type"] == "qwen2" else set()
    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": w(h, mean=6.0, std=0.3)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}{norm}.weight"] = w(h, mean=1.0, std=0.1)
        for name, (rows, cols) in linears.items():
            tensors[f"{p}{name}.weight"] = w(rows, cols)
            if name in biased:
                tensors[f"{p}{name}.bias"] = w(rows, std=0.1)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(folder, cfg["vocab_size"])
    return cfg


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """Token i is the word "t{i}": prompts go in as ids, and every id the model picks decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text("{}")
