"""`kvserve bench throughput`: N random prompts of fixed input/output length (ignore_eos), offline.

Prints requests/s, output tokens/s and total tokens/s; with `--baseline hf`, runs Hugging Face
transformers' batched generate on the same prompts in the same run (in its own venv, see
hf_baseline.py) and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HF_BASELINE_SCRIPT = Path(__file__).with_name("hf_baseline.py")
DEFAULT_HF_VENV = Path(".bench/venv-hf")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="tokens of one random prefix shared by every prompt, before its --input-len distinct tokens "
        "(as vLLM's --random-prefix-len); measures prefix caching",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0,
        help="sampling temperature (default 1.0 with top_p 1, as `vllm bench throughput`; 0 = greedy)",
    )  # fmt: skip
    p.add_argument("--baseline", choices=("none", "hf"), default="none")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF generate batch size (default: all prompts)")
    p.add_argument(
        "--baseline-python",
        default=None,
        help=f"python of the venv with transformers for the baseline (default: {DEFAULT_HF_VENV}, created if missing)",
    )


def random_prompts(num: int, length: int, vocab_size: int, avoid: set[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in avoid]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(num)]


def with_shared_prefix(
    prompts: list[list[int]], prefix_len: int, vocab_size: int, avoid: set[int], seed: int
) -> list[list[int]]:
    """Prompts for the shared-prefix benchmark: one random prefix of prefix_len tokens before each prompt."""
    prefix = random_prompts(1, prefix_len, vocab_size, avoid, seed + 1)[0]
    return [prefix + prompt for prompt in prompts]


def report(name: str, num: int, in_len: int, out_len: int, seconds: float) -> dict:
    r = {
        "engine": name,
        "seconds": seconds,
        "requests_per_s": num / seconds,
        "output_tokens_per_s": num * out_len / seconds,
        "total_tokens_per_s": num * (in_len + out_len) / seconds,
    }
    print(
        f"{name:>10}: {seconds:8.2f} s  {r['requests_per_s']:8.2f} req/s  "
        f"{r['output_tokens_per_s']:9.1f} output tok/s  {r['total_tokens_per_s']:9.1f} total tok/s",
        flush=True,
    )
    return r


def run(args: argparse.Namespace, engine_kwargs: dict) -> None:
    from kvserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    tokenizer = llm.get_tokenizer()
    config = llm.llm_engine.config
    avoid = set(tokenizer.all_special_ids)
    prompts = random_prompts(args.num_prompts, args.input_len, config.model.vocab_size, avoid, args.random_seed)
    warmup = prompts[:2]  # without the shared prefix: the timed run computes it once, as vLLM's does
    if args.prefix_len:
        prompts = with_shared_prefix(prompts, args.prefix_len, config.model.vocab_size, avoid, args.random_seed)
    in_len = args.prefix_len + args.input_len
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature, top_p=1.0)
    llm.generate(warmup, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outputs)
    print(f"model={config.model.path} dtype={config.model.dtype} prompts={args.num_prompts} "
          f"input={in_len} (shared prefix {args.prefix_len}) output={args.output_len} "
          f"temperature={args.temperature} threads={_threads()}",
          flush=True)  # fmt: skip
    ours = report("kvserve", args.num_prompts, in_len, args.output_len, elapsed)
    if args.baseline == "hf":
        del llm
        base = run_hf_baseline(args, config.model.path, config.model.dtype, prompts)
        report("hf", args.num_prompts, in_len, args.output_len, base["seconds"])
        print(f"ratio kvserve / hf (output tok/s): {base['seconds'] / ours['seconds']:.2f}x", flush=True)


def run_hf_baseline(args: argparse.Namespace, model_path: str, dtype: str, prompts: list[list[int]]) -> dict:
    python = args.baseline_python or str(_ensure_hf_venv())
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [
        python, str(HF_BASELINE_SCRIPT), "--model", model_path, "--dtype", dtype, "--prompts", f.name,
        "--output-len", str(args.output_len), "--batch-size", str(args.hf_batch_size or len(prompts)),
        "--temperature", str(args.temperature),
    ]  # fmt: skip
    try:
        result = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    finally:
        os.unlink(f.name)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ensure_hf_venv() -> Path:
    """A venv of its own for the peer, so that transformers never enters the project's dependencies."""
    python = DEFAULT_HF_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {DEFAULT_HF_VENV} for the transformers baseline (once)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(DEFAULT_HF_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["transformers", "accelerate", "gguf"], check=True)
    return python


def _threads() -> int:
    import torch

    return torch.get_num_threads()
