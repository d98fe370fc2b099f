"""ops/cpu_layers.CpuLayerStack (all decoder layers in one C++ call) against its reference, the
Python layers: on the tiny model in bfloat16, the same tokens and bit-identical logprobs, with the
stack covering the decode steps and declining the steps it does not cover."""
from __future__ import annotations

import pytest
import torch

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.ops import cpu_ops
from kvserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_ops.decode_matmul_max_rows(32, 16) == 0, reason="the decode kernels need a CPU with AVX512_BF16"
)


def _run(model_dir: str, use_stack: bool, prompts: list[list[int]], params: list[SamplingParams]):
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model_dir, dtype="bfloat16", kv_cache_memory_bytes=64 << 20, max_num_seqs=32,
                   max_num_batched_tokens=256)  # fmt: skip
    )
    body = engine.runner.model.model
    stack = body.layer_stack
    assert stack is not None  # the tiny model's shapes suit the decode kernels (K % 32, N % 16)
    calls = {"covered": 0, "declined": 0}

    def counted(hidden, cos_sin):
        result = stack(hidden, cos_sin)
        calls["covered" if result is not None else "declined"] += 1
        return result

    body.layer_stack = counted if use_stack else None
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                outputs[out.request_id] = (c.token_ids, c.logprobs)
    return outputs, calls


def test_layer_stack_matches_the_python_layers_bit_for_bit(tiny_llama_dir):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 40, 5, 64, 9, 33, 120]
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True) for _ in prompts]
    params[1] = SamplingParams(temperature=0.8, seed=7, max_tokens=30, logprobs=1, ignore_eos=True)
    stacked, calls = _run(tiny_llama_dir, True, prompts, params)
    layers, no_calls = _run(tiny_llama_dir, False, prompts, params)
    assert no_calls == {"covered": 0, "declined": 0}
    assert calls["covered"] >= 20 and calls["declined"] >= 1  # decode steps covered; prompt steps declined
    assert stacked.keys() == layers.keys()
    for key in layers:
        assert stacked[key][0] == layers[key][0]
        assert stacked[key][1] == layers[key][1]  # logprob floats equal exactly: the same kernels, same order
