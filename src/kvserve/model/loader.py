"""Build a model from its ModelConfig and stream the checkpoint's weights into it.

The model is constructed directly on the target device with uninitialised storage. Every layer
allocates with torch.empty, so this costs no more than meta + `to_empty`, and unlike `to_empty`
(which replaces each Parameter object) it keeps the `weight_loader` attached to each parameter.
It is then filled one checkpoint tensor at a time, so peak memory is the model plus one tensor.
Checkpoint names are Hugging Face names; the model's `packed_modules_mapping` routes q/k/v and
gate/up tensors into its fused parameters.
"""
from __future__ import annotations

import gc
import glob
import json
import logging
import os
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from kvserve import host_memory
from kvserve.config import ModelConfig
from kvserve.layers.embedding import ParallelLMHead
from kvserve.layers.linear import LinearMethod
from kvserve.layers.rotary import RotaryEmbedding
from kvserve.model import hf_quant
from kvserve.model.gguf_loader import gguf_tensor_types, iter_gguf_weights, keep_gguf_blocks, log_gguf_types, read_gguf
from kvserve.model.registry import get_model_class

logger = logging.getLogger(__name__)


def load_model(config: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The model of `config` on `device`, in config.dtype, with all weights loaded, in eval mode."""
    with torch.device(device):
        model = get_model_class(config.architecture)(config)
    if config.path.endswith(".gguf"):
        blocks: set[str] = set()
        if config.quantization == "gguf":
            types = gguf_tensor_types(config.path)
            blocks = keep_gguf_blocks(model, types)
            log_gguf_types(types, blocks)
        num_tensors, weights = iter_gguf_weights(config.path, config, blocks)
        progress = tqdm(weights, total=num_tensors, desc="Loading weights", unit="tensor", leave=False)
    else:
        names, weights = _iter_safetensors(config.path)
        transform = hf_quant.prepare(model, config, names)
        progress = tqdm(weights, total=len(names), desc="Loading weights", unit="tensor", leave=False)
        progress = transform(progress) if transform is not None else progress
    with torch.no_grad():
        load_weights(model, progress)
    keep_decode_copy = _room_for_second_copy(model)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.init_cache()  # allocated uninitialised, like the weights
        if isinstance(getattr(module, "linear_method", None), LinearMethod):
            module.linear_method.process_weights_after_loading(module, keep_decode_copy=keep_decode_copy)
        elif isinstance(module, ParallelLMHead):
            module.process_weights_after_loading(keep_decode_copy=keep_decode_copy)
    if config.path.endswith(".gguf"):
        # The parsed file (every metadata string a numpy array: ~130 MB for the default model's
        # vocabulary, plus the mapped file) served the config, the tokenizer and the weights; the
        # engine loads them in that order, so nothing reads it after this.
        read_gguf.cache_clear()
        gc.collect()
        host_memory.release_freed_memory()
    logger.info("weights: %.1f MB in memory (%s)", _weight_bytes(model) / 1e6, config.quantization or config.dtype)
    return model.eval()


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and of the second copies layers keep (decode / oneDNN layouts)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for extra in ("decode_weight", "_decode", "_packed"):
            t = getattr(module, extra, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _room_for_second_copy(model: nn.Module) -> bool:
    """Whether a layer may keep its weight in two layouts (oneDNN-packed for large batches and the
    decode kernel's for small ones): only when all the weights take at most a tenth of the memory
    available now, so that a big model is never doubled."""
    if next(model.parameters()).device.type != "cpu":
        return False
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes <= 0.1 * host_memory.available_bytes()


def _default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (HF name, tensor) pairs into the model's parameters; raise if any parameter was not filled.

    Tolerated extras: `lm_head.weight` of a tied model and stale `rotary_emb.inv_freq` buffers."""
    params = dict(model.named_parameters())
    mapping: dict[str, tuple[str, object]] = model.packed_modules_mapping
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()  # checkpoint names consumed
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        param_name, shard_id = name, None
        for ckpt_module, (fused_module, shard) in mapping.items():
            if f".{ckpt_module}." in name:
                param_name, shard_id = name.replace(f".{ckpt_module}.", f".{fused_module}."), shard
                break
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        param = params[param_name]
        getattr(param, "weight_loader", _default_weight_loader)(param, tensor, shard_id)
        loaded.add(name)
    missing = _expected_checkpoint_names(params, mapping) - loaded
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {', '.join(sorted(missing))}")


def _expected_checkpoint_names(params: dict[str, nn.Parameter], mapping: dict[str, tuple[str, object]]) -> set[str]:
    """Every checkpoint name the model needs: each fused parameter expands into its shards' names."""
    shards_of: dict[str, list[str]] = {}
    for ckpt_module, (fused_module, _) in mapping.items():
        shards_of.setdefault(fused_module, []).append(ckpt_module)
    expected = set()
    for name in params:
        fused = next((f for f in shards_of if f".{f}." in name), None)
        if fused is None:
            expected.add(name)
        else:
            expected.update(name.replace(f".{fused}.", f".{ckpt}.") for ckpt in shards_of[fused])
    return expected


def _safetensors_files(folder: str) -> list[str]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors in the folder.

    The index wins because some repos also ship a consolidated copy under another name."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return files


def _iter_safetensors(folder: str) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]]:
    """-> (every tensor's name, iterator of (name, tensor)); each tensor is read only when reached."""
    files = _safetensors_files(folder)
    names: list[str] = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.extend(f.keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return names, tensors()
