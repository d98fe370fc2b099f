"""The device check (issue 17): one command on a lent GPU, a few minutes, nothing downloaded.

It builds seeded random-weight Hugging Face folders in SmolLM2-135M's and Qwen2.5-0.5B's shapes and
prints, for each:
  (a) float32 exactness: kvserve's greedy tokens and logprobs vs Hugging Face transformers on the
      same device, 8 prompts of 3 to 436 tokens (3 share a 256-token prefix), run plain, with chunked
      prefill, and twice with prefix caching (the second from the cache), kvserve's defaults otherwise
      (CUDA graphs on): identical tokens, logprobs within 1e-3;
  (b) bf16 speed: batch-1 decode ms/token vs the HBM roofline (weight + KV bytes read per token /
      the measured device copy bandwidth), and offline output tok/s vs HF `generate` (static batch);
  (c) (b) with CUDA graphs on and off (LLM's enforce_eager);
  (d) the fused Triton norms, rotary and SiLU-and-mul (ops/triton_ops.py) against their torch-native
      references: each op's time alone (eager launches, and inside a CUDA graph) at decode and
      prompt sizes (benchmarks/gpu_parts.py), then (b) again with them off (custom_ops ["none"]);
  (e) the Triton cascade (gpu_parts.py): 64 prompts after one cached 2,048-token prefix, 64 tokens
      each, eager with the cascade on and off, and with decode graphs (which do not take it).
(d)'s engine runs with the fused ops off and (e) run on the 0.5B shape only.
Then the targets for the 0.5B shape: decode >= 50% of the roofline, offline >= 5x HF, exactness.

`python benchmarks/gpu_check.py --device cuda` is the GPU run (benchmarks/gpu_run.sh adds the wheels
carried with it); `--device cpu` is the dry run: the same code minus graphs and Triton, on 2 layers
of each shape (real widths, heads and vocabularies) and tiny speed counts. Exits 1 when (a) fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # kvserve from this checkout
os.environ.setdefault("TQDM_DISABLE", "1")  # no weight-loading bars (read when tqdm is imported)

import torch  # noqa: E402

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.bench.throughput import random_prompts  # noqa: E402

from gpu_models import SHAPES, build_model  # noqa: E402  (beside this file)
from gpu_parts import cascade_timing, op_timings, prompts_of, release, sync  # noqa: E402

TARGET = "Qwen2.5-0.5B"  # the shape the targets speak of


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the full check on a GPU, the dry run on a CPU."""

    layers: Optional[int]  # None: the shape's own
    new_tokens: int  # (a) greedy tokens per prompt
    decode: tuple[int, int]  # (b) batch-1 prompt and output lengths
    offline: tuple[int, int, int]  # (b) prompts, input and output lengths
    hf_batch: int  # HF generate's static batch
    copy_bytes: int  # the bandwidth probe's buffer
    kv_bytes: int  # kvserve's KV cache budget in (b)


PLANS = {
    "cuda": Plan(None, 32, (32, 256), (256, 256, 128), 256, 1 << 30, 4 << 30),
    "cpu": Plan(2, 16, (16, 16), (4, 16, 8), 4, 256 << 20, 256 << 20),
}
TOLERANCE = 1e-3


# --- (a) exactness -----------------------------------------------------------------------------
def exactness_prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    """5 prompts of 3 to 130 tokens, then 3 sharing a 256-token prefix (268 to 436 tokens)."""
    alone = [random_prompts(1, n, vocab, set(), seed + n)[0] for n in (3, 9, 24, 61, 130)]
    prefix = random_prompts(1, 256, vocab, set(), seed)[0]
    return alone + [prefix + random_prompts(1, n, vocab, set(), seed + n)[0] for n in (12, 40, 180)]


def hf_greedy(folder: Path, prompts: list[list[int]], n: int, device: str) -> list[tuple]:
    """HF greedy decoding of each prompt alone: (tokens, chosen logprobs, top-1 margins) per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
            lps = torch.log_softmax(torch.cat(gen.logits).float(), dim=-1)  # [n, V]
            tokens = gen.sequences[0, len(ids) :]
            top2 = lps.topk(2, dim=-1).values
            chosen = lps.gather(1, tokens[:, None])[:, 0]
            out.append((tokens.tolist(), chosen.tolist(), (top2[:, 0] - top2[:, 1]).tolist()))
    del model
    release(device)
    return out


def kvserve_greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[tuple]:
    """(tokens, chosen logprobs, prompt tokens from the prefix cache) per prompt, batched."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1, detokenize=False)
    result = []
    for o in llm.generate(prompts_of(prompts), params, use_tqdm=False):
        c = o.outputs[0]
        lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
        result.append((list(c.token_ids), lps, o.num_cached_tokens))
    return result


def check_exactness(folder: Path, cfg: dict, device: str, plan: Plan) -> bool:
    prompts = exactness_prompts(cfg["vocab_size"])
    reference = hf_greedy(folder, prompts, plan.new_tokens, device)
    runs = {}
    for mode, kwargs in (("plain", dict(enable_prefix_caching=False)),
                         ("chunked", dict(enable_prefix_caching=False, max_num_batched_tokens=32)),
                         ("prefix", dict(enable_prefix_caching=True))):  # fmt: skip
        llm = LLM(str(folder), dtype="float32", device=device, max_model_len=1024, kv_cache_memory_bytes=512 << 20,
                  **kwargs)  # fmt: skip
        backend = llm.llm_engine.runner.backend.name
        runs[mode] = kvserve_greedy(llm, prompts, plan.new_tokens)
        if mode == "prefix":  # the first run filled the cache: now every full block is a hit
            runs["prefix-hit"] = kvserve_greedy(llm, prompts, plan.new_tokens)
        del llm
        release(device)
    ok = True
    for i, (ids, (ref_tokens, ref_lps, margins)) in enumerate(zip(prompts, reference)):
        cells = []
        for mode, results in runs.items():
            tokens, lps, cached = results[i]
            if tokens == ref_tokens:
                diff = max(abs(a - b) for a, b in zip(lps, ref_lps))
                ok &= diff < TOLERANCE
                cells.append(f"{mode} same {diff:.1e}")
            else:
                ok = False
                first = next((j for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(margins) - 1)
                cells.append(f"{mode} DIFFER from token {first} (HF's top-1 margin there {margins[first]:.1e})")
            cells[-1] += f" (cached {cached})" if mode == "prefix-hit" else ""
        print(f"  prompt {i} ({len(ids):3d} tokens, min top-1 margin {min(margins):.3f}): " + " | ".join(cells))
    hits = sum(r[2] for r in runs["prefix-hit"])
    ok &= hits > 0
    print(f"  (a) float32, {plan.new_tokens} greedy tokens x 8 prompts x 4 runs (attention {backend}; prefix hits "
          f"{hits} tokens): {'PASS' if ok else 'FAIL'} (tokens identical, |logprob diff| < {TOLERANCE})")  # fmt: skip
    return ok


# --- (b) speed, (c) graphs -----------------------------------------------------------------------
def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, read and write counted."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def roofline_ms(folder: Path, cfg: dict, plan: Plan, bandwidth: float) -> float:
    """Batch-1 decode's floor: the bf16 weights (tied: the head is the embedding) and the KV cache at
    the mean context, read once per token."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        weights = 2 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 2  # bf16 K and V
    in_len, out_len = plan.decode
    read = weights + kv_token * (in_len + out_len / 2)
    ms = read / bandwidth * 1000
    print(f"  roofline: {read / 1e6:.1f} MB read per token (weights {weights / 1e6:.1f} MB + KV at mean context "
          f"{in_len + out_len // 2}) / {bandwidth / 1e9:.0f} GB/s = {ms:.3f} ms/token")  # fmt: skip
    return ms


def decode_ms_per_token(llm: LLM, vocab: int, plan: Plan) -> float:
    """Batch 1: (time of in + out tokens - time of in + 1) / (out - 1), three distinct prompts."""
    in_len, out_len = plan.decode
    warm, first, full = random_prompts(3, in_len, vocab, set(), 7)
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)  # noqa: E731
    llm.generate(prompts_of([warm]), params(16), use_tqdm=False)
    times = []
    for prompt, n in ((first, 1), (full, out_len)):
        t0 = time.perf_counter()
        llm.generate(prompts_of([prompt]), params(n), use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) * 1000 / (out_len - 1)


def kvserve_offline(llm: LLM, prompts: list[list[int]], warmup: list[list[int]], out_len: int) -> float:
    """Seconds for all prompts at once, after a warm-up on as many others (no prefix-cache hits)."""
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts_of(warmup), SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts_of(prompts), params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    return seconds


def hf_offline(folder: Path, prompts: list[list[int]], out_len: int, batch: int, device: str) -> float:
    """HF generate, bf16, static batches of equal-length prompts (so no padding), greedy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts, device=device)

    def generate(x, n):
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)  # fmt: skip

    with torch.inference_mode():
        generate(ids[:batch], 4)  # warm-up at the batch's shape
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(ids), batch):
            assert generate(ids[i : i + batch], out_len).shape[1] == ids.shape[1] + out_len
        sync(device)
        seconds = time.perf_counter() - t0
    del model
    release(device)
    return seconds


def _config_value(config, name: str):
    """A field anywhere in the engine's nested config dataclasses, else None."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == name:
            return value
        if dataclasses.is_dataclass(value) and (found := _config_value(value, name)) is not None:
            return found
    return None


def speed_mode(
    folder: Path, cfg: dict, device: str, plan: Plan, eager: bool, prompts, floor_ms: float, fused: bool = True
) -> dict:
    """(b) on one engine: batch-1 decode, then offline throughput; fused: the Triton norms, rotary and
    SiLU (custom_ops all), else their torch-native references (none)."""
    num, in_len, out_len = plan.offline
    llm = LLM(str(folder), dtype="bfloat16", device=device, enforce_eager=eager, max_model_len=1024,
              max_num_seqs=256, kv_cache_memory_bytes=plan.kv_bytes,
              compilation_config={"custom_ops": ["all" if fused else "none"]})  # fmt: skip
    honoured = _config_value(llm.llm_engine.config, "enforce_eager") is not None
    backend = llm.llm_engine.runner.backend.name
    ms = decode_ms_per_token(llm, cfg["vocab_size"], plan)
    warmup = random_prompts(num, in_len, cfg["vocab_size"], set(), 12)
    tok_s = num * out_len / kvserve_offline(llm, prompts, warmup, out_len)
    del llm
    release(device)
    fused_text = f", fused ops {'on' if fused else 'off'}" if device.startswith("cuda") else ""  # (a CPU's: C++)
    print(f"  (b) kvserve bf16, enforce_eager={eager}{'' if honoured else ' (this build ignores it)'}{fused_text}, "
          f"attention "
          f"{backend}: batch-1 decode {ms:.3f} ms/token = {floor_ms / ms:.0%} of the roofline; "
          f"offline {num} x {in_len} in / {out_len} out: {tok_s:.0f} output tok/s")  # fmt: skip
    return {"ms": ms, "roofline": floor_ms / ms, "tok_s": tok_s}


def check_speed(folder: Path, cfg: dict, device: str, plan: Plan, bandwidth: float, unfused: bool = True) -> dict:
    """(b) and (c): {"modes": {"graphs on" / "graphs off" / "eager": ...}, "hf_tok_s": ...}; a mode
    that raises is reported and left out."""
    floor_ms = roofline_ms(folder, cfg, plan, bandwidth)
    num, in_len, out_len = plan.offline
    prompts = random_prompts(num, in_len, cfg["vocab_size"], set(), 11)
    on_cuda, modes = device.startswith("cuda"), {}
    runs = [(True, True)]  # (eager, fused ops): a CPU has no graphs, and its own fused kernels
    if on_cuda:
        runs = [(False, True), (True, True)] + ([(False, False), (True, False)] if unfused else [])
    for eager, fused in runs:  # (d): the last two, fused ops off
        try:
            name = ("graphs off" if eager else "graphs on") if on_cuda else "eager"
            name += "" if fused else ", unfused"
            modes[name] = speed_mode(folder, cfg, device, plan, eager, prompts, floor_ms, fused)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            release(device)
    for graphs in ("graphs on", "graphs off") if on_cuda else ():
        on, off = modes.get(graphs), modes.get(graphs + ", unfused")
        if on and off:
            print(f"  (d) fused ops on / off, {graphs}: batch-1 decode {on['ms']:.3f} / {off['ms']:.3f} ms/token "
                  f"({off['ms'] / on['ms']:.2f}x), offline {on['tok_s']:.0f} / {off['tok_s']:.0f} "
                  f"tok/s ({on['tok_s'] / off['tok_s']:.2f}x)")  # fmt: skip
    if not on_cuda:
        print("  (c) CUDA graphs: CUDA only, skipped on this device")
    elif "graphs on" in modes and "graphs off" in modes:
        on, off = modes["graphs on"], modes["graphs off"]
        print(f"  (c) CUDA graphs on / off: batch-1 decode {on['ms']:.3f} / {off['ms']:.3f} ms/token "
              f"({off['ms'] / on['ms']:.2f}x), offline {on['tok_s']:.0f} / {off['tok_s']:.0f} tok/s")  # fmt: skip
    hf_tok_s = num * out_len / hf_offline(folder, prompts, out_len, plan.hf_batch, device)
    best = max((m["tok_s"] for m in modes.values()), default=None)  # (over fused and unfused: the best we serve)
    print(f"  (b) HF transformers generate, bf16, static batch {plan.hf_batch}: {hf_tok_s:.0f} output tok/s; "
          + (f"kvserve's best / HF = {best / hf_tok_s:.2f}x" if best else "kvserve not measured"))  # fmt: skip
    return {"modes": modes, "hf_tok_s": hf_tok_s}


# --- the run ------------------------------------------------------------------------------------
def print_environment(device: str) -> None:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"device {device}: {name}; torch {torch.__version__}, triton {triton_version}, "
          f"transformers {transformers.__version__}, python {platform.python_version()}")  # fmt: skip


def print_targets(exact: dict[str, bool], speed: dict[str, Optional[dict]], device: str) -> None:
    print(f"targets ({TARGET} shape):")
    modes = (speed.get(TARGET) or {}).get("modes")
    if not device.startswith("cuda"):
        for target in ("batch-1 decode >= 50% of the HBM roofline", "offline >= 5x HF generate"):
            print(f"  {target}: dry run, timing still to be taken")
    elif not modes:
        print("  batch-1 decode and offline targets: not measured (see the errors above)")
    else:
        mode, best = max(modes.items(), key=lambda kv: kv[1]["roofline"])
        print(f"  batch-1 decode >= 50% of the HBM roofline: {best['roofline']:.0%} ({mode}): "
              f"{'met' if best['roofline'] >= 0.5 else 'not met'}")  # fmt: skip
        mode, best = max(modes.items(), key=lambda kv: kv[1]["tok_s"])
        ratio = best["tok_s"] / speed[TARGET]["hf_tok_s"]
        print(f"  offline >= 5x HF generate: {ratio:.2f}x ({mode}): {'met' if ratio >= 5 else 'not met'}")
    if TARGET in exact:
        print(f"  float32 exactness vs HF (plain, chunked, prefix hits): {'met' if exact[TARGET] else 'not met'}")


def run_shape(shape: str, folder: Path, args, plan: Plan, bandwidth: Optional[float], results: dict) -> None:
    """(a), then (b) and (c), of one shape; a section that raises is reported and counts as failed."""
    layers = args.layers or plan.layers or SHAPES[shape]["num_hidden_layers"]
    t0 = time.perf_counter()
    cfg = build_model(folder, shape, layers, args.device)
    print(f"== {shape} shape, {layers} of {SHAPES[shape]['num_hidden_layers']} layers, random weights "
          f"(built in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    sections = {"exact": lambda: check_exactness(folder, cfg, args.device, plan)}
    if bandwidth:
        # (d)'s engine runs and (e) on the targets' shape only: the whole check stays within a few minutes.
        sections["speed"] = lambda: check_speed(folder, cfg, args.device, plan, bandwidth, unfused=shape == TARGET)
        if args.device.startswith("cuda"):
            sections["ops"] = lambda: op_timings(cfg, args.device)
            if shape == TARGET:
                sections["cascade"] = lambda: cascade_timing(folder, cfg, args.device, plan.kv_bytes)
    for key, section in sections.items():
        t0 = time.perf_counter()
        try:
            results[key][shape] = section()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            results[key][shape] = False if key == "exact" else None
            release(args.device)
        print(f"  ({key} took {time.perf_counter() - t0:.0f} s)")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run)")
    p.add_argument("--layers", type=int, default=None, help="layers of each shape (default: all on CUDA, 2 on a CPU)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--new-tokens", type=int, default=None, help="(a)'s greedy tokens per prompt")
    p.add_argument("--skip-speed", action="store_true", help="(a) only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = PLANS["cuda" if args.device.startswith("cuda") else "cpu"]
    if args.new_tokens:
        plan = dataclasses.replace(plan, new_tokens=args.new_tokens)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in (a), for HF too
    print_environment(args.device)
    bandwidth = None if args.skip_speed else copy_bandwidth(args.device, plan.copy_bytes)
    if bandwidth:
        print(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    results, t_start = {"exact": {}, "speed": {}, "ops": {}, "cascade": {}}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for shape in args.shapes:
            run_shape(shape, Path(tmp) / shape, args, plan, bandwidth, results)
    exact = results["exact"]
    print_targets(exact, results["speed"], args.device)
    ok = bool(exact) and all(exact.values())
    print(f"done in {time.perf_counter() - t_start:.0f} s; exactness {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
