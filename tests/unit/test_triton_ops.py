"""The GPU's fused Triton ops (ops/triton_ops.py through ops/gpu_ops.py) under Triton's interpreter,
against the layers' torch-native references; which ops vLLM's custom_ops turns on.

The kernels run in one spawned worker whose environment sets TRITON_INTERPRET=1 (Triton reads it on
import) and KVSERVE_CPU_ISA=none (so the CPU kernels step aside and the layers reach gpu_ops), with
gpu_ops told to take CPU tensors. bfloat16 results must equal the references bit for bit (the kernels
round where they round; a rare 1-ulp flip allowed, see assert_bf16_rounded_alike); float32 ones
differ only by the order of a sum and by exp's last bit.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from kvserve.engine.arg_utils import EngineArgs
from kvserve.ops import gpu_ops

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (make install-test installs it)"
)


def _worker_env() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["KVSERVE_CPU_ISA"] = "none"


@pytest.fixture(scope="module")
def interpreter():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_env) as pool:
        yield pool


def _fused_on_cpu(custom_ops=("all",)) -> frozenset:
    """In the worker: gpu_ops takes CPU tensors and turns on the given ops."""
    gpu_ops._device_type = "cpu"
    return gpu_ops.configure(custom_ops, "cpu")


def run_ops(dtype: torch.dtype, hq: int, hkv: int, d: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """In the worker: each op through the layer (fused) and through its reference, on ragged, strided
    inputs as a model step makes them. Returns name -> (fused, reference)."""
    import torch.nn.functional as F

    from kvserve.layers.activation import SiluAndMul
    from kvserve.layers.norm import RMSNorm
    from kvserve.layers.rotary import RotaryEmbedding

    assert _fused_on_cpu() == frozenset(gpu_ops.CUSTOM_OPS)
    torch.manual_seed(0)
    t, hidden, inter = 7, 96, 160  # hidden and intermediate sizes not powers of two: masked tails
    results = {}
    norm = RMSNorm(hidden, 1e-5, dtype=dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)
    x, residual = torch.randn(t, hidden).to(dtype), torch.randn(t, hidden) * 4
    results["rms_norm"] = (norm(x), norm._norm(x))
    fused_residual = residual.clone()
    out, new_residual = norm(x, fused_residual)
    assert new_residual is fused_residual  # the sum was written in place
    results["add_rms_norm"] = (out, norm._norm(x.float() + residual))
    results["residual"] = (new_residual, x.float() + residual)

    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)  # q and k: strided views, as the model splits them
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    head_norm = RMSNorm(d, 1e-6, dtype=dtype)  # Qwen3's per-head q/k norm over a [T, H, D] view
    head_norm.weight.data = torch.randn(d).to(dtype)
    results["qk_norm"] = (head_norm(q.unflatten(-1, (hq, d))), head_norm._norm(q.unflatten(-1, (hq, d))))

    rotary = RotaryEmbedding(d, 4096, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    rotary.init_cache()
    cos_sin = rotary.cos_sin(torch.tensor([0, 1, 5, 17, 300, 1023, 4095]))
    cos, sin = cos_sin.chunk(2, dim=-1)
    want_q, want_k = rotary._rotate(q.clone(), cos, sin), rotary._rotate(k.clone(), cos, sin)
    before = qkv.clone()
    got_q, got_k = rotary(cos_sin, q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    results["rotary_q"], results["rotary_k"] = (got_q, want_q), (got_k, want_k)
    results["v_untouched"] = (qkv[:, (hq + hkv) * d :], before[:, (hq + hkv) * d :])

    gate_up = torch.randn(t, 2 * inter + 8).to(dtype)[:, : 2 * inter]  # rows strided
    gate, up = gate_up.chunk(2, dim=-1)
    results["silu_and_mul"] = (SiluAndMul()(gate_up), F.silu(gate) * up)
    return results


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (6, 2, 80)], ids=["mha-64", "gqa4-128", "gqa3-80"])
def test_fused_ops_match_references(interpreter, dtype, hq, hkv, d):
    """Add + RMSNorm (residual float32, written in place), RMSNorm alone and per head over a strided
    [T, H, D] view, rotary in place on q and k views of one qkv tensor (v untouched), SiLU-and-mul on
    strided rows: bfloat16 bit for bit but for rare 1-ulp flips, float32 within a few ulps."""
    results = interpreter.submit(run_ops, dtype, hq, hkv, d).result()
    for name, (got, want) in results.items():
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name in ("residual", "v_untouched"):
            assert torch.equal(got, want), name
        elif dtype == torch.bfloat16:
            assert_bf16_rounded_alike(got, want, name)
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def assert_bf16_rounded_alike(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal bit for bit but for rare 1-ulp flips (at least 99% of the values equal, none further
    apart): the float32 inside differs from torch's by the order of a sum (numpy's in the
    interpreter, torch's vectorised one, each per CPU) or exp's last bit, which crosses a bfloat16
    rounding boundary for ~1e-5 of the values. A rounding point missed or added moves far more
    (rounding by truncation, as the interpreter's casts do: 298 of 672 norm outputs)."""
    got, want = got.float(), want.float()
    _, exponent = torch.frexp(want)  # |want| = m * 2^e with m in [0.5, 1): bf16 spacing 2^(e - 8)
    spacing = torch.where(want == 0, torch.zeros_like(want), torch.ldexp(torch.ones_like(want), exponent - 8))
    diff = (got - want).abs()
    assert (diff <= spacing).all(), f"{name}: {int((diff > spacing).sum())} values more than 1 bf16 ulp apart"
    assert (diff == 0).float().mean() >= 0.99, f"{name}: {int((diff > 0).sum())} of {diff.numel()} differ"


def generate_greedy(model_dir: str) -> dict:
    """In the worker: the tiny model's greedy tokens and logprobs (float32) with the fused ops all
    on, then all off (vLLM's custom_ops), and how often each fused kernel ran."""
    from kvserve import LLM, SamplingParams
    from kvserve.ops import triton_ops

    gpu_ops._device_type = "cpu"
    calls = {"rms_norm": 0, "silu_and_mul": 0, "rotary_": 0}
    for name in calls:
        def counted(*args, _fn=getattr(triton_ops, name), _name=name):
            calls[_name] += 1
            return _fn(*args)

        setattr(triton_ops, name, counted)
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)
    results = {}
    for ops in (["all"], ["none"]):
        llm = LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20,
                  compilation_config={"custom_ops": ops})  # fmt: skip
        assert llm.llm_engine.runner.backend.name == "torch"  # KVSERVE_CPU_ISA=none: no CPU kernels
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        results[ops[0]] = [
            (list(c.token_ids), [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]) for c in outs
        ]
        results[f"calls_{ops[0]}"] = dict(calls)
    return results


@needs_triton
def test_engine_with_fused_ops_gives_the_same_greedy_tokens(interpreter, tiny_llama_dir):
    """The whole model with its norms, rotary and SiLU through the Triton kernels: the same tokens as
    the torch-native ops, logprobs within float32 rounding; `custom_ops: ["none"]` runs none of them."""
    results = interpreter.submit(generate_greedy, tiny_llama_dir).result()
    on, off = results["calls_all"], results["calls_none"]
    assert all(n > 0 for n in on.values()), on
    assert off == on, "custom_ops none still ran a fused kernel"
    for (ids, lps), (want_ids, want_lps) in zip(results["all"], results["none"]):
        assert ids == want_ids
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), atol=1e-4, rtol=0)


def test_custom_ops_resolve_as_vllm_reads_them():
    every = frozenset(gpu_ops.CUSTOM_OPS)
    assert gpu_ops.resolve_custom_ops(("all",)) == every
    assert gpu_ops.resolve_custom_ops(("none",)) == frozenset()
    assert gpu_ops.resolve_custom_ops(()) == every  # vLLM's default without inductor
    assert gpu_ops.resolve_custom_ops(("-rms_norm",)) == every - {"rms_norm"}
    assert gpu_ops.resolve_custom_ops(("none", "+rms_norm", "all", "-silu_and_mul")) == every - {"silu_and_mul"}
    assert gpu_ops.resolve_custom_ops(("none", "+silu_and_mul")) == {"silu_and_mul"}
    with pytest.raises(ValueError, match="'\\+fused_moe'.*rms_norm, silu_and_mul, rotary_embedding"):
        gpu_ops.resolve_custom_ops(("+fused_moe",))


def test_fused_ops_stay_off_on_a_cpu():
    """The engine's configure() on a CPU device turns nothing on: the C++ kernels serve a CPU."""
    assert gpu_ops.configure(("all",), "cpu") == frozenset()
    x = torch.randn(2, 8)
    assert gpu_ops.rms_norm(x, torch.ones(8), 1e-6) is None and gpu_ops.silu_and_mul(x) is None


@pytest.mark.parametrize(
    "given,custom_ops,cap,eager",
    [
        (None, ("all",), 256, False),
        (3, ("all",), 256, False),  # vLLM's -O level: nothing to set here
        ({"custom_ops": ["none", "+rms_norm"], "level": 3}, ("none", "+rms_norm"), 256, False),
        ('{"max_cudagraph_capture_size": 64, "custom_ops": ["-rotary_embedding"]}', ("-rotary_embedding",), 64, False),
        ({"enforce_eager": True}, ("all",), 256, True),
    ],
)
def test_compilation_config_as_vllm_takes_it(given, custom_ops, cap, eager):
    compilation = EngineArgs(compilation_config=given).compilation()
    assert (compilation.custom_ops, compilation.max_cudagraph_capture_size) == (custom_ops, cap)
    assert compilation.enforce_eager is eager


@pytest.mark.parametrize(
    "given,match",
    [
        ("{custom_ops", "not JSON"),
        ([1, 2], "JSON object or a dict"),
        ({"custom_ops": "all"}, "list of strings"),
        ({"custom_ops": ["+silu"]}, "'\\+silu' is not understood"),
        ({"max_cudagraph_capture_size": -1}, "int >= 0"),
    ],
)
def test_compilation_config_errors_name_the_field(given, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(compilation_config=given).compilation()


@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("backend,arch", [("cuda", 90), ("hip", "gfx942")], ids=["sm90", "gfx942"])
def test_fused_ops_compile_for_gpus(backend, arch):
    """Each kernel, bfloat16 and float32, compiles to a CUDA (H100) or ROCm (MI300) binary: no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from kvserve.ops import triton_ops

    target = GPUTarget(backend, arch, 32 if backend == "cuda" else 64)
    binary = "cubin" if backend == "cuda" else "hsaco"
    scalars = {"heads": "i32", "stride_xt": "i32", "stride_xh": "i32", "eps": "fp32", "stride_x": "i32",
               "stride_q": "i32", "stride_k": "i32"}  # fmt: skip
    for dtype, bf16 in (("bf16", True), ("fp32", False)):
        kernels = [
            (triton_ops._rms_norm_kernel, dict(D=896, BLOCK=1024, HAS_RES=True, BF16=bf16), {"res_ptr": "*fp32"}),
            (triton_ops._silu_and_mul_kernel, dict(I=4864, BLOCK=1024, BF16=bf16), {}),
            (triton_ops._rotary_kernel, dict(HQ=14, D=64, BLOCK=32, BF16=bf16), {"cos_sin_ptr": "*fp32"}),
        ]
        for fn, consts, pointers in kernels:
            sig = {
                n: "constexpr" if n in consts else pointers.get(n, scalars.get(n, f"*{dtype}")) for n in fn.arg_names
            }
            assert binary in compile(ASTSource(fn, sig, consts), target=target).asm
