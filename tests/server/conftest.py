"""A real `kvserve serve` subprocess on a free loopback port, started once per module (or session) and
polled on /health until ready. The tiny random-weight model serves load, error and fault tests (it loads
in a second); the default model serves the OpenAI-client feature tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import pytest

TINY_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)]
DEFAULT_MODEL_NAME = "smollm2"
DEFAULT_ENGINE = {"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20}


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    saw_503_while_loading: bool
    seconds_to_ready: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """/metrics as {series: value}, e.g. {'kvserve:kv_blocks_in_use': 0.0}."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).raise_for_status().text)

    async def ametrics(self, client: httpx.AsyncClient) -> dict[str, float]:
        return parse_metrics((await client.get(f"{self.url}/metrics")).raise_for_status().text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], log_dir: Path, env: Optional[dict[str, str]] = None, api_key: Optional[str] = None,
    timeout: float = 180,
) -> ServerProcess:  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log_path = log_dir / f"server-{port}.log"
    full_env = {**os.environ, **(env or {})}
    src = str(Path(__file__).resolve().parents[2] / "src")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, full_env.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    url, saw_503 = f"http://127.0.0.1:{port}", False
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kvserve serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"kvserve serve not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
            if status == 200:
                return ServerProcess(proc, url, log_path, saw_503, time.monotonic() - t0)
            saw_503 = saw_503 or status == 503
        except httpx.TransportError:
            pass
        time.sleep(0.05)


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir, tmp_path_factory):
    """Shared by the load, disconnect and error tests (they only compare metric deltas)."""
    server = start_server(
        [tiny_llama_dir, *TINY_ARGS, "--max-num-seqs", "64", "--log-stats-interval", "1"],
        tmp_path_factory.mktemp("tiny-server"),
    )
    yield server
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The default model served as DEFAULT_MODEL_NAME with DEFAULT_ENGINE's limits and tool_choice "auto"
    (hermes: SmolLM2's <tool_call> format), started once for the modules that drive it with clients (OpenAI
    and TGI features, structured output, tool calling)."""
    server = start_server(
        ["--served-model-name", DEFAULT_MODEL_NAME, "--max-model-len", str(DEFAULT_ENGINE["max_model_len"]),
         "--kv-cache-memory-bytes", str(DEFAULT_ENGINE["kv_cache_memory_bytes"]),
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        tmp_path_factory.mktemp("default-server"),
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="session")
def default_client(default_server):
    import openai

    return openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
