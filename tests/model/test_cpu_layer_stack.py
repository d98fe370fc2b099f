"""ops/cpu_layers.CpuLayerStack (all decoder layers of a step in one C++ call) against its
reference, the Python layers: tiny bfloat16 models, the same tokens and bit-identical logprobs,
with the stack covering decode steps and steps that mix fresh prompts with decodes, and declining
the steps it does not cover."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.forward_context import get_attention_metadata
from kvserve.ops import cpu_ops
from kvserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_ops.decode_matmul_max_rows(32, 16) == 0, reason="the decode kernels need a CPU with AVX512_BF16"
)
AMX = cpu_ops.decode_matmul_max_rows(32, 16) > 4  # then fresh prompts go through the AMX prefill kernel


def _run(model_dir: str, use_stack: bool):
    """Greedy and seeded requests with logprobs, half of them arriving while the first half decodes.
    -> ({request id: (token ids, logprobs)}, the stack's step counts)."""
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model_dir, dtype="bfloat16", kv_cache_memory_bytes=64 << 20, max_num_seqs=32,
                   max_num_batched_tokens=256, enable_prefix_caching=False)  # fmt: skip
    )
    body = engine.runner.model.model
    stack = body.layer_stack
    assert stack is not None  # the tiny models' shapes suit the decode kernels (K % 32, N % 16)
    calls = {"decode": 0, "with fresh prompts": 0, "declined": 0}

    def counted(hidden, cos_sin):
        fresh = bool(get_attention_metadata().backend_state.fresh)
        result = stack(hidden, cos_sin)
        calls["declined" if result is None else "with fresh prompts" if fresh else "decode"] += 1
        return result

    body.layer_stack = counted if use_stack else None
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 40, 5, 64, 9, 33, 120, 20, 7]
    requests = []
    for i, n in enumerate(lengths):
        p = SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True)
        if i % 4 == 1:
            p = SamplingParams(temperature=0.8, seed=i, max_tokens=30, logprobs=1, ignore_eos=True)
        requests.append((str(i), torch.randint(3, 200, (n,), generator=g).tolist(), p))
    outputs, steps = {}, 0
    while requests[:5] or engine.has_unfinished_requests():
        if steps in (0, 6):  # the second half arrives while the first decodes
            for request in requests[:5]:
                engine.add_request(*request)
            requests = requests[5:]
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
        steps += 1
    return outputs, calls


@pytest.mark.parametrize("shape", [dict(), dict(hidden=128, heads=2, kv_heads=1)], ids=["head16", "head64"])
def test_layer_stack_matches_the_python_layers_bit_for_bit(tmp_path, shape):
    model_dir = build_tiny_llama(tmp_path, **shape)
    stacked, calls = _run(model_dir, True)
    layers, no_calls = _run(model_dir, False)
    assert no_calls == {"decode": 0, "with fresh prompts": 0, "declined": 0}
    assert calls["decode"] >= 20
    # Fresh prompts: the AMX prefill kernel where it applies (head size 64 with AMX), else declined.
    if AMX and shape:
        assert calls["with fresh prompts"] >= 2
    else:
        assert calls["with fresh prompts"] == 0 and calls["declined"] >= 2
    assert len(layers) == 10 and stacked.keys() == layers.keys()
    for key in layers:
        assert stacked[key][0] == layers[key][0]
        assert stacked[key][1] == layers[key][1]  # logprob floats equal exactly: the same kernels, same order
