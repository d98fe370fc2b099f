"""ops/cpu_layers.CpuLayerStack (all decoder layers of a step in one C++ call) against its
reference, the Python layers: tiny bfloat16 models, the same tokens and bit-identical logprobs,
with the stack covering decode steps and steps that mix fresh prompts with decodes, and declining
the steps it does not cover."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_gguf, build_tiny_llama
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.forward_context import get_attention_metadata
from kvserve.model.config_loader import default_model_path
from kvserve.ops import cpu_ops
from kvserve.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.isa,  # again at each lower CPU level (Makefile)
    pytest.mark.skipif(
        cpu_ops.decode_matmul_max_rows(32, 16) == 0, reason="the CPU kernels are off (KVSERVE_CPU_ISA=none) or unbuilt"
    ),
]
AMX = cpu_ops.amx_in_use()  # then fresh prompts go through the AMX prefill kernel


def _run(model_dir: str, use_stack: bool, shared_prefix: int = 0, dtype: str = "bfloat16"):
    """Greedy and seeded requests with logprobs, half of them arriving while the first half decodes;
    with shared_prefix, every prompt starts with the same that many tokens (prefix caching on).
    -> ({request id: (token ids, logprobs)}, the stack's step counts, the stack's max rows)."""
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model_dir, tokenizer=default_model_path() if model_dir.endswith(".gguf") else None,
                   dtype=dtype, kv_cache_memory_bytes=64 << 20, max_num_seqs=32, max_num_batched_tokens=512,
                   enable_prefix_caching=bool(shared_prefix))  # fmt: skip
    )
    body = engine.runner.model.model
    stack = body.layer_stack
    assert stack is not None  # the tiny models' shapes suit the decode kernels (K % 32, N % 16)
    calls = {"decode": 0, "with fresh prompts": 0, "cascade": 0, "declined": 0}

    def counted(hidden, cos_sin):
        plan = get_attention_metadata().backend_state
        result = stack(hidden, cos_sin)
        kind = "cascade" if plan.cascade is not None else "with fresh prompts" if plan.fresh else "decode"
        calls["declined" if result is None else kind] += 1
        return result

    body.layer_stack = counted if use_stack else None
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 40, 5, 64, 9, 33, 120, 20, 7]
    prefix = torch.randint(3, 200, (shared_prefix,), generator=g).tolist()
    requests = []
    for i, n in enumerate(lengths):
        p = SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True)
        if i % 4 == 1:
            p = SamplingParams(temperature=0.8, seed=i, max_tokens=30, logprobs=1, ignore_eos=True)
        requests.append((str(i), prefix + torch.randint(3, 200, (n,), generator=g).tolist(), p))
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
    return outputs, calls, stack.max_rows


HEAD64 = dict(hidden=128, heads=2, kv_heads=1)


@pytest.mark.parametrize(
    "shape,shared_prefix", [(dict(), 0), (HEAD64, 0), (HEAD64, 272)], ids=["head16", "head64", "head64-shared-prefix"]
)
def test_layer_stack_matches_the_python_layers_bit_for_bit(tmp_path, shape, shared_prefix):
    model_dir = build_tiny_llama(tmp_path, **shape)
    stacked, calls, _ = _run(model_dir, True, shared_prefix)
    layers, no_calls, _ = _run(model_dir, False, shared_prefix)
    assert set(no_calls.values()) == {0}
    # The decode matmul, and so the stack, takes up to 512 rows with AMX (48 on AVX2, 64 on AVX-512,
    # 4 with AVX512_BF16's dot product): the tiny models' decode steps carry up to 10 rows. Without
    # AMX, steps over a shared prefix decline while the cascade covers them.
    whole_steps = cpu_ops.decode_matmul_max_rows(32, 16) >= 10 and (AMX or not shared_prefix)
    assert calls["decode"] + calls["cascade"] >= (20 if whole_steps else 1)
    # Fresh prompts and shared prefixes: AMX kernels where they apply (head size 64 with AMX), else declined.
    if AMX and shape:
        if shared_prefix:
            assert calls["cascade"] >= 10
        else:
            assert calls["with fresh prompts"] >= 1 and calls["cascade"] == 0
    else:
        assert calls["with fresh prompts"] == calls["cascade"] == 0 and calls["declined"] >= 2
    assert len(layers) == 10 and stacked.keys() == layers.keys()
    for key in layers:
        assert stacked[key][0] == layers[key][0]
        assert stacked[key][1] == layers[key][1]  # logprob floats equal exactly: the same kernels, same order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_stack_over_gguf_blocks_matches_the_python_layers_bit_for_bit(tmp_path, dtype):
    """Linears kept as GGUF blocks (Q4_0, Q4_1, Q8_0: the block kernel), in float32 (no AMX attention:
    steps with fresh prompts decline) and bf16."""
    path = build_tiny_gguf(tmp_path / "tiny.gguf")
    stacked, calls, max_rows = _run(path, True, 0, dtype)
    assert calls["decode"] >= (20 if max_rows >= 10 else 1)
    if dtype == "float32" or not AMX:
        assert calls["with fresh prompts"] == 0 and calls["declined"] >= 2
    layers, no_calls, _ = _run(path, False, 0, dtype)
    assert set(no_calls.values()) == {0}
    assert len(layers) == 10 and stacked.keys() == layers.keys()
    for key in layers:
        assert stacked[key] == layers[key]  # tokens and logprob floats exactly
