"""Write the default model (the Q4_1 GGUF of SmolLM2-135M-Instruct) as a Hugging Face folder with bf16 safetensors.

Both engines of `make bench-compare` read this folder, so they run the very same weights: kvserve's own
GGUF loader dequantizes each tensor (and undoes llama.cpp's q/k row permutation), and the result is cast
to bfloat16 once, here. The folder holds config.json, generation_config.json, model.safetensors,
tokenizer.json and tokenizer_config.json (with the chat template and the special tokens).

    PYTHONPATH=src .venv/bin/python benchmarks/export_default_model.py OUT_DIR [--check]

--check loads the folder and the GGUF in kvserve (both in bfloat16) and asserts that greedy outputs match.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from kvserve.config import ModelConfig
from kvserve.engine.tokenizer import Tokenizer, load_tokenizer
from kvserve.model.config_loader import default_model_path, load_model_config
from kvserve.model.gguf_loader import iter_gguf_weights

DTYPE = "bfloat16"
CHECK_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "1, 2, 3, 5, 8,",
]


def hf_config(config: ModelConfig) -> dict:
    """config.json for a LlamaForCausalLM, as transformers writes it (both transformers 4 and 5 read it)."""
    assert config.architecture == "LlamaForCausalLM", config.architecture
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": config.rope_scaling,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": DTYPE,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def generation_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    eos = list(config.eos_token_ids)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    return gen


def tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict:
    """No add_bos_token key: tokenizer.json's post-processor (none for SmolLM2) decides, in every reader."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": getattr(tokenizer.backend.model, "unk_token", None),
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": tokenizer.chat_template,
    }
    return {k: v for k, v in cfg.items() if v is not None}


def bf16_state_dict(gguf_path: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named bf16 tensors. A tied model keeps only the embedding (lm_head is the same matrix)."""
    _, weights = iter_gguf_weights(gguf_path, config)
    tensors = {}
    for name, tensor in weights:
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = tensor.to(torch.bfloat16).contiguous()
    return tensors


def export(out_dir: str, gguf_path: str) -> None:
    config = load_model_config(gguf_path, dtype="float32")
    tokenizer = load_tokenizer(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    save_file(bf16_state_dict(gguf_path, config), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.backend.save(os.path.join(out_dir, "tokenizer.json"))
    files = {
        "config.json": hf_config(config),
        "generation_config.json": generation_config(config, tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, config.max_position_embeddings),
    }
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    print(f"wrote {out_dir} from {gguf_path}", file=sys.stderr)


def greedy(model: str, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
    from kvserve import LLM, SamplingParams

    llm = LLM(model=model, dtype=DTYPE, kv_cache_memory_bytes=64 << 20)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def check(out_dir: str, gguf_path: str) -> None:
    """Greedy outputs of kvserve on the folder and on the GGUF (both bf16) must be identical."""
    from_folder, from_gguf = greedy(out_dir, CHECK_PROMPTS), greedy(gguf_path, CHECK_PROMPTS)
    if from_folder != from_gguf:
        raise SystemExit(f"greedy outputs differ between {out_dir} and {gguf_path}")
    print(f"check: kvserve greedy outputs on the folder and the GGUF match ({len(CHECK_PROMPTS)} prompts)",
          file=sys.stderr)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--gguf", default=None, help="GGUF to export (default: kvserve's default model)")
    p.add_argument("--check", action="store_true", help="also check kvserve greedy equality, folder vs GGUF")
    p.add_argument("--force", action="store_true", help="rewrite the folder even if it exists")
    args = p.parse_args()
    gguf_path = args.gguf or default_model_path()
    if args.force or not os.path.isfile(os.path.join(args.out_dir, "model.safetensors")):
        export(args.out_dir, gguf_path)
    if args.check:
        check(args.out_dir, gguf_path)


if __name__ == "__main__":
    main()
