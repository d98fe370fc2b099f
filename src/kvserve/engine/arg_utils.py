"""EngineArgs: the user-facing knobs (vLLM's names), resolved once into a frozen EngineConfig."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from kvserve.config import (
    KV_CACHE_DTYPES,
    SUPPORTED_DTYPES,
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)

logger = logging.getLogger(__name__)


@dataclass
class EngineArgs:
    model: Optional[str] = None  # HF folder or .gguf file; None: the default model
    tokenizer: Optional[str] = None  # defaults to model
    dtype: str = "auto"
    quantization: Optional[str] = None  # None | "gguf" | "none" (config.QUANTIZATIONS)
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    # Step budget while requests decode (Scheduler._prefill_budget). Default: for a server on a CPU,
    # a quarter of the budget, since a full 2,048-token step takes ~0.5 s that every newly arrived
    # request and every decoding stream waits out. Served 256/128-token streams, 512 vs 1,024 tokens
    # (budget 2,048), noisy host: p99 ITL c=16 176 / 163 vs 281 / 238 ms, c=64 202-256 vs 323-373 ms;
    # median TTFT c=16 493 / 385 vs 618 / 590 ms; output tok/s equal within the host's +-10% swings.
    # Else the whole budget: a GPU's steps are short, and offline nobody waits for a first token (the
    # short budget cut the offline benchmarks' throughput: 256 x 256 prompts / 128 tokens 41.3-43.8
    # vs 46.5-47.1 s, 256 x (1,024 shared + 64) / 64 tokens 17.6-17.8 vs 18.5-20.4 s).
    max_num_batched_tokens_while_decoding: Optional[int] = None
    serving: bool = False  # an online server (requests arrive while others decode), not offline use
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    kv_cache_memory_bytes: Optional[int] = None
    kv_cache_memory_fraction: float = 0.25
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_dtype: str = "auto"  # config.KV_CACHE_DTYPES
    enforce_eager: bool = False  # no CUDA graphs for decode steps (vLLM's flag; a CPU never captures)
    # vLLM's compilation_config: a dict or its JSON text; custom_ops and max_cudagraph_capture_size
    # apply, other keys (inductor levels, ...) mean nothing here and are logged; an int (vLLM's -O
    # level) is accepted and ignored.
    compilation_config: Any = None

    def create_engine_config(self) -> EngineConfig:
        import torch

        from kvserve.model.config_loader import default_model_path, load_model_config

        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model_path = self.model or default_model_path()
        model_config = load_model_config(model_path, dtype=self.dtype, device=device, quantization=self.quantization)
        model_config, cache_dtype = _activation_and_cache_dtypes(model_config, self.kv_cache_dtype)

        max_model_len = self.max_model_len or model_config.max_position_embeddings
        if max_model_len > model_config.max_position_embeddings:
            logger.warning(
                "max_model_len=%d exceeds the model's max_position_embeddings=%d; outputs past that may degrade",
                max_model_len,
                model_config.max_position_embeddings,
            )
        budget = self.max_num_batched_tokens or max(2048, self.max_num_seqs)
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_seqs < 1 or budget < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        short_budget = self.max_num_batched_tokens_while_decoding
        if short_budget is None:
            short_budget = max(1, budget // 4) if device == "cpu" and self.serving else budget
        if short_budget < 1:
            raise ValueError(f"max_num_batched_tokens_while_decoding must be positive, got {short_budget}")
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                cache_dtype=cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                kv_cache_memory_fraction=self.kv_cache_memory_fraction,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                prefault_in_background=self.serving and device == "cpu",
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                max_num_batched_tokens_while_decoding=min(short_budget, budget),
            ),
            compilation=self.compilation(),
            device=device,
            seed=self.seed,
        )

    def compilation(self) -> CompilationConfig:
        """compilation_config (vLLM's shapes) + enforce_eager -> the frozen CompilationConfig."""
        from kvserve.ops.gpu_ops import resolve_custom_ops

        given = self.compilation_config
        if isinstance(given, CompilationConfig):
            given = dataclasses.asdict(given)
        if isinstance(given, str):
            try:
                given = json.loads(given)
            except json.JSONDecodeError as error:
                raise ValueError(f"compilation_config is not JSON ({error}): {given!r}") from None
        if given is None or isinstance(given, int):
            given = {}
        if not isinstance(given, dict):
            raise ValueError(f"compilation_config must be a JSON object or a dict, got {type(given).__name__}")
        known = {"custom_ops", "max_cudagraph_capture_size", "enforce_eager"}
        ignored = sorted(set(given) - known)
        if ignored:
            logger.info("compilation_config: ignoring %s (no meaning here)", ", ".join(ignored))
        custom_ops = given.get("custom_ops", CompilationConfig.custom_ops)
        if isinstance(custom_ops, str) or not all(isinstance(op, str) for op in custom_ops):
            raise ValueError(f"compilation_config custom_ops must be a list of strings, got {custom_ops!r}")
        resolve_custom_ops(tuple(custom_ops))  # raises on an entry it does not know
        capture = given.get("max_cudagraph_capture_size", CompilationConfig.max_cudagraph_capture_size)
        if not isinstance(capture, int) or isinstance(capture, bool) or capture < 0:
            raise ValueError(f"compilation_config max_cudagraph_capture_size must be an int >= 0, got {capture!r}")
        return CompilationConfig(
            enforce_eager=self.enforce_eager or bool(given.get("enforce_eager", False)),
            max_cudagraph_capture_size=capture, custom_ops=tuple(custom_ops),
        )


def _activation_and_cache_dtypes(model: ModelConfig, kv_cache_dtype: str) -> tuple[ModelConfig, str]:
    """-> (the model config with its activation dtype, the KV cache's dtype).

    bfloat16 over a GGUF's blocks runs float32 activations with a bfloat16 KV cache (and attention):
    the block kernels sum in float32 and take float32 x at no extra cost (decode reads the blocks,
    not the activations), so bf16 buys nothing there but rounding. Measured on the default model,
    64 prompts x 16 greedy tokens against float32: all-bf16 activations kept float32's tokens on 53
    (mean |logprob difference| of the chosen tokens 0.013), this on 62 (0.004); bf16 weights, 59 (0.015).
    Only for GGUF, whose embeddings and LM head are blocks too: int8 / int4 / AWQ / GPTQ folders keep
    dense embeddings in the model dtype, and a float32 LM head would read twice the bytes per step."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if model.quantization == "gguf" and model.dtype == "bfloat16":
        logger.info("bfloat16 over GGUF blocks: activations float32 (the block kernels take them as they are), "
                    "KV cache and attention bfloat16")  # fmt: skip
        model = dataclasses.replace(model, dtype="float32")
        if kv_cache_dtype == "auto":
            kv_cache_dtype = "bfloat16"
    cache = model.dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    if cache != model.dtype and not (model.dtype == "float32" and cache == "bfloat16"):
        raise ValueError(f"kv_cache_dtype {cache} with {model.dtype} activations is not supported: leave it "
                         "auto (the activations' dtype), or bfloat16 under float32 activations")  # fmt: skip
    return model, cache
