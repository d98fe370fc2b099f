"""Frozen configuration, built once at the edge (LLM constructor, CLI) and read everywhere below.

Nothing under kvserve reads the environment except this module. No torch here: core/ imports it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
# --quantization: None = the checkpoint's own (a GGUF keeps its blocks, an AWQ / GPTQ folder its int4),
# "gguf" / "awq" / "gptq" = insist on that, "none" = dequantize every GGUF weight at load, "int8" /
# "int4" = quantize a float checkpoint's linears at load (weight-only; model/hf_quant.py).
QUANTIZATIONS = (None, "gguf", "none", "int8", "int4", "awq", "gptq")
# --kv-cache-dtype (vLLM's flag): "auto" = the model's activation dtype (or bfloat16 under a bf16
# request over GGUF blocks: EngineArgs); else the cache's own (bfloat16 under float32 activations).
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder, read from config.json or GGUF metadata."""

    path: str  # HF folder or a .gguf file
    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    rope_scaling: Optional[dict[str, Any]] = None  # HF rope_scaling dict, rope_type normalised
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # Checkpoint dtype as a string ("float32", "bfloat16", "float16"); GGUF reports "float32".
    checkpoint_dtype: str = "float32"
    # Dtype we compute in, resolved from the user's choice ("auto" never reaches here).
    dtype: str = "float32"
    # How weights are kept, resolved at the edge: None = dense in `dtype`; "gguf" = a GGUF's tensors in
    # the block types the CPU kernels take stay in their blocks (model/gguf_loader.py); "int8" / "int4" /
    # "awq" / "gptq": the linears in blocks (model/hf_quant.py).
    quantization: Optional[str] = None
    # config.json's quantization_config (AWQ / GPTQ checkpoints), as the checkpoint has it.
    checkpoint_quantization: Optional[dict[str, Any]] = None

    def with_dtype(self, dtype: str) -> "ModelConfig":
        return dataclasses.replace(self, dtype=dtype)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # The KV cache's dtype, resolved ("float32" / "bfloat16" / "float16"; never "auto"): the model's
    # activation dtype, or bfloat16 under float32 activations, where attention runs in bf16.
    cache_dtype: str = "float32"
    enable_prefix_caching: bool = True
    # Exact KV budget in bytes; when None, kv_cache_memory_fraction of available memory is used.
    kv_cache_memory_bytes: Optional[int] = None
    kv_cache_memory_fraction: float = 0.25
    # Overrides the memory budget entirely (tests use it to force preemption).
    num_gpu_blocks_override: Optional[int] = None
    # CPU: fault the cache's pages in on a background thread once allocated (a server, which then
    # waits for requests; offline runs step at once and would only compete with it).
    prefault_in_background: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # A shorter step budget while requests decode (Scheduler._prefill_budget); None: always the full budget.
    max_num_batched_tokens_while_decoding: Optional[int] = None


@dataclass(frozen=True)
class CompilationConfig:
    """CUDA graphs of decode-only steps (worker/cuda_graphs.py) and the GPU's fused Triton ops
    (ops/gpu_ops.py); both apply only on a GPU."""

    enforce_eager: bool = False  # vLLM's flag: no graphs, every step runs eagerly
    # Largest decode batch captured (vLLM's name); the ladder stops at min(this, max_num_seqs), and a
    # larger decode-only step runs eagerly.
    max_cudagraph_capture_size: int = 256
    # vLLM's custom_ops: "all" / "none", then "+op" / "-op" (rms_norm, silu_and_mul, rotary_embedding).
    custom_ops: tuple[str, ...] = ("all",)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    device: str = "cpu"
    seed: int = 0
