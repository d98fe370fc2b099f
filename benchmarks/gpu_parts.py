"""Parts of the GPU check (benchmarks/gpu_check.py) timed piece by piece, and the device helpers the
check shares:
  (d) the fused Triton norms, rotary and SiLU-and-mul (ops/triton_ops.py): their bf16 results against
      the torch-native references on the device, then each op's time alone, eager launches and inside
      a CUDA graph, at decode and prompt sizes;
  (e) the Triton attention cascade: prompts after one cached prefix, eager with the cascade on and off,
      and with decode graphs (which do not take it).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from kvserve import LLM, SamplingParams
from kvserve.bench.throughput import random_prompts


def release(device: str) -> None:
    """Free what the last engine or model held, before the next one loads."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts_of(prompts: list[list[int]]) -> list[dict]:
    """Token-id prompts as LLM.generate takes them."""
    return [{"prompt_token_ids": p} for p in prompts]


# --- (d) fused ops alone -------------------------------------------------------------------------
def op_timings(cfg: dict, device: str, sizes: tuple[int, ...] = (1, 64, 256, 4096)) -> None:
    """Each fused op and its torch-native reference (the layer's own code, fused ops on and off),
    bf16 at the shape's widths, T tokens: microseconds per call with eager launches (what an eager
    step pays), and per call inside one captured CUDA graph of 20 calls (what a decode graph pays)."""
    from kvserve.layers.activation import SiluAndMul
    from kvserve.layers.norm import RMSNorm
    from kvserve.layers.rotary import RotaryEmbedding
    from kvserve.ops import gpu_ops

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // hq
    norm = RMSNorm(hidden, cfg["rms_norm_eps"], dtype=torch.bfloat16).to(device)
    norm.weight.data.normal_(1.0, 0.1)
    rotary, act = RotaryEmbedding(d, 4096, cfg["rope_theta"]).to(device), SiluAndMul()
    rotary.init_cache()
    print("  (d) fused op vs torch-native, bf16, us per call, eager launches / inside a CUDA graph:")
    check_bf16_kernels(cfg, device, norm, rotary, act)
    for t in sizes:
        x = torch.randn(t, hidden, device=device, dtype=torch.bfloat16)
        residual = torch.randn(t, hidden, device=device)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, dtype=torch.bfloat16)
        q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        cos_sin = rotary.cos_sin(torch.arange(t, device=device) % 4096)
        gate_up = torch.randn(t, 2 * inter, device=device, dtype=torch.bfloat16)
        ops = {
            "add+rms_norm": lambda: norm(x, residual),
            "rotary": lambda: rotary(cos_sin, q, k),
            "silu_and_mul": lambda: act(gate_up),
        }
        cells = []
        for name, fn in ops.items():
            times = {}
            for fused in (True, False):
                gpu_ops.configure(("all",) if fused else ("none",), device)
                times[fused] = (_us_per_call(fn, device), _us_per_call_in_graph(fn, device))
            (fe, fg), (re, rg) = times[True], times[False]
            cells.append(f"{name} {fe:.1f} / {fg:.1f} vs {re:.1f} / {rg:.1f} ({re / fe:.1f}x / {rg / fg:.1f}x)")
        print(f"      T={t:5d}: " + "; ".join(cells))
    gpu_ops.configure(("all",), device)


def check_bf16_kernels(cfg: dict, device: str, norm, rotary, act, t: int = 256) -> None:
    """bf16 results of the Triton kernels against the torch-native references on this device (the
    interpreter tests on a CPU cannot run a bf16 tl.dot): the fused ops within one bf16 ulp (mostly
    bit for bit), attention (a prompt, decodes after it, GQA) within a bf16 rounding."""
    from kvserve.attention.metadata import build_attention_metadata
    from kvserve.attention.torch_ref import TorchAttentionBackend
    from kvserve.attention.triton_attn import TritonAttentionBackend
    from kvserve.ops import gpu_ops

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // hq
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x, residual = torch.randn(t, hidden, **bf16), torch.randn(t, hidden, device=device)
    qkv, gate_up = torch.randn(t, (hq + 2 * hkv) * d, **bf16), torch.randn(t, 2 * inter, **bf16)
    cos_sin = rotary.cos_sin(torch.arange(t, device=device))
    results = {}
    for fused in (True, False):
        gpu_ops.configure(("all",) if fused else ("none",), device)
        q, k, _ = qkv.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
        results[fused] = (norm(x, residual.clone())[0], *rotary(cos_sin, q, k), act(gate_up))
    gpu_ops.configure(("all",), device)
    # Largest difference in bf16 units in the last place of the reference (2^-7 relative): 0 bit for bit,
    # 1 where a float32 sum's order or exp's last bit moved a rounding.
    diffs = [
        ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-2)).max().item() * 128
        for a, b in zip(results[True], results[False])
    ]
    names = ("add+rms_norm", "rotary q", "rotary k", "silu_and_mul")
    cells = [f"{name} {diff:.2f}" for name, diff in zip(names, diffs)]
    # Attention: request 0 a 200-token prompt, requests 1-3 one decode each after 100-300 cached keys.
    bs, lens, seqs = 16, [200, 1, 1, 1], [200, 101, 257, 300]
    tables = [list(range(i * 20, i * 20 + -(-n // bs))) for i, n in enumerate(seqs)]
    cache = torch.randn(2, 80, bs, hkv, d, **bf16)
    q, k, v = (torch.randn(sum(lens), h, d, **bf16) for h in (hq, hkv, hkv))
    outs = []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        meta = build_attention_metadata(lens, seqs, tables, bs, device=device)
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, cache.clone(), meta, d**-0.5))
    attention = (outs[0].float() - outs[1].float()).abs().max().item()
    ok = max(diffs) <= 1.01 and attention < 0.05
    print(f"      bf16 fused vs reference, most ulps apart: {', '.join(cells)}; Triton attention vs torch_ref max "
          f"|diff| {attention:.1e}: {'as expected' if ok else 'CHECK'} (<= 1 ulp; attention < 5e-2)")  # fmt: skip


def _us_per_call(fn, device: str, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters * 1e6


def _us_per_call_in_graph(fn, device: str, calls: int = 20, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as torch's capture asks
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    sync(device)
    return (time.perf_counter() - t0) / (calls * replays) * 1e6


# --- (e) the cascade -------------------------------------------------------------------------------
def cascade_timing(folder: Path, cfg: dict, device: str, kv_bytes: int, prefix_len: int = 2048, reqs: int = 64,
                   out_len: int = 64) -> None:  # fmt: skip
    """Seconds for `reqs` prompts (a cached prefix + 16 tokens of their own) x out_len tokens, bf16."""
    prefix = random_prompts(1, prefix_len, cfg["vocab_size"], set(), 21)[0]
    own = random_prompts(reqs, 16, cfg["vocab_size"], set(), 22)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, detokenize=False)
    cells = []
    for name, eager, cascade in (("eager, cascade on", True, True), ("eager, cascade off", True, False),
                                 ("graphs", False, False)):  # fmt: skip
        llm = LLM(str(folder), dtype="bfloat16", device=device, enforce_eager=eager, max_model_len=4096,
                  max_num_seqs=256, kv_cache_memory_bytes=kv_bytes)  # fmt: skip
        backend = llm.llm_engine.runner.backend
        if hasattr(backend, "min_cascade_requests") and not cascade:
            backend.min_cascade_requests = 1 << 30
        llm.generate(prompts_of([prefix]), SamplingParams(max_tokens=1), use_tqdm=False)  # cache the prefix
        llm.generate(prompts_of([prefix + p for p in own[:8]]), SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts_of([prefix + p[::-1] for p in own]), params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        cells.append(f"{name} {reqs * out_len / seconds:.0f} tok/s (cached {cached // reqs} per prompt)")
        del llm
        release(device)
    print(f"  (e) {reqs} prompts after a cached {prefix_len}-token prefix, {out_len} tokens each, output tok/s: "
          + "; ".join(cells))  # fmt: skip
