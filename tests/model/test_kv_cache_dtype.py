"""The KV cache's dtype apart from the activations' (EngineArgs.kv_cache_dtype, vLLM's --kv-cache-dtype):
how it resolves, and that attention then runs on a bf16 cache under float32 activations."""
from __future__ import annotations

import pytest
import torch

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.model.config_loader import default_model_path
from kvserve.ops import cpu_build
from kvserve.sampling_params import SamplingParams


def _dtypes(**kw) -> tuple[str | None, str, str]:
    config = EngineArgs(**kw).create_engine_config()
    return config.model.quantization, config.model.dtype, config.cache.cache_dtype


@pytest.mark.skipif(cpu_build.load() is None, reason="no CPU kernel library: a GGUF is dequantized at load")
def test_bfloat16_over_blocks_keeps_float32_activations_and_a_bfloat16_cache():
    gguf = default_model_path()
    assert _dtypes(model=gguf, dtype="bfloat16") == ("gguf", "float32", "bfloat16")
    assert _dtypes(model=gguf, dtype="float32") == ("gguf", "float32", "float32")
    assert _dtypes(model=gguf, dtype="float32", kv_cache_dtype="bfloat16") == ("gguf", "float32", "bfloat16")
    # Dequantized at load: dense bf16 weights compute in bf16, their cache too.
    assert _dtypes(model=gguf, dtype="bfloat16", quantization="none") == (None, "bfloat16", "bfloat16")


def test_quantized_folders_keep_bfloat16_activations(tiny_llama_dir):
    # Their embeddings and LM head stay dense: in float32 the head would read twice the bytes per step.
    assert _dtypes(model=tiny_llama_dir, dtype="bfloat16", quantization="int8") == ("int8", "bfloat16", "bfloat16")


def test_kv_cache_dtype_errors_say_what_is_supported(tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineArgs(model=tiny_llama_dir, kv_cache_dtype="fp8").create_engine_config()
    with pytest.raises(ValueError, match="bfloat16 under float32 activations"):
        EngineArgs(model=tiny_llama_dir, dtype="bfloat16", kv_cache_dtype="float32").create_engine_config()


def _greedy(model: str, kv_cache_dtype: str) -> tuple[LLMEngine, list[tuple[list[int], list[float]]]]:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model, dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=16 << 20)
    )
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((5, 40, 17)):
        prompt = torch.randint(3, 200, (n,), generator=g).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True))
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                outputs[out.request_id] = (c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
    return engine, [outputs[k] for k in sorted(outputs)]


def test_float32_activations_over_a_bfloat16_cache(tiny_llama_dir):
    """The cache really holds bf16, and what attention reads from it is only bf16-rounded: the tiny
    model's greedy tokens stay, its logprobs move (by up to 0.20 here: random weights amplify it)."""
    f32_engine, f32 = _greedy(tiny_llama_dir, "auto")
    bf16_engine, bf16 = _greedy(tiny_llama_dir, "bfloat16")
    assert all(c.dtype == torch.float32 for c in f32_engine.runner.kv_caches)
    assert all(c.dtype == torch.bfloat16 for c in bf16_engine.runner.kv_caches)
    assert [t for t, _ in bf16] == [t for t, _ in f32]
    diffs = [abs(a - b) for (_, la), (_, lb) in zip(f32, bf16) for a, b in zip(la, lb)]
    assert 0 < max(diffs) < 0.5
