"""GPU smoke check: the same engine code on CUDA gives CPU's greedy tokens and logprobs.

Usage: `python benchmarks/gpu_check.py prepare DIR` (on the CPU box: writes a tiny random Llama,
its tokenizer and the CPU engine's greedy outputs into DIR), then
`python benchmarks/gpu_check.py check DIR` on a CUDA machine. Prints one line per prompt and
exits 1 on any mismatch. Needs no downloads: the tiny model is built from a seed.
`python benchmarks/gpu_check.py --device cpu|cuda` does both in one run, in a temporary folder: on
a CPU it runs the whole check (no Triton there: the CPU's attention backend), to see that it runs.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time"] * 4


def _run(folder: str, device: str):
    from kvserve import LLM, SamplingParams

    llm = LLM(folder, dtype="float32", device=device, kv_cache_memory_bytes=256 << 20, max_num_seqs=16)
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=1, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    results = []
    for o in outs:
        c = o.outputs[0]
        results.append({"ids": list(c.token_ids), "lps": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    return results, elapsed


def prepare(folder: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_llama

    build_tiny_llama(Path(folder))
    results, _ = _run(folder, "cpu")
    (Path(folder) / "cpu_outputs.json").write_text(json.dumps(results))
    print(f"wrote {folder}")


def check(folder: str, device: str = "cuda") -> int:
    import torch

    expected = json.loads((Path(folder) / "cpu_outputs.json").read_text())
    results, elapsed = _run(folder, device)
    bad = 0
    for i, (got, want) in enumerate(zip(results, expected)):
        same = got["ids"] == want["ids"]
        diff = max(abs(a - b) for a, b in zip(got["lps"], want["lps"])) if same else float("nan")
        ok = same and diff < 1e-3
        bad += not ok
        print(f"prompt {i}: tokens {'identical' if same else 'DIFFER'}, max |logprob diff| {diff:.2e}")
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device
    print(f"device {name}: {len(results)} prompts in {elapsed:.2f} s; mismatches: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--device":  # prepare and check in one run
        with tempfile.TemporaryDirectory() as tmp:
            prepare(tmp)
            sys.exit(check(tmp, sys.argv[2]))
    cmd, folder = sys.argv[1], sys.argv[2]
    if cmd == "prepare":
        prepare(folder)
    else:
        sys.exit(check(folder))
