"""SIGTERM / SIGINT: the server stops accepting, lets the in-flight request finish, and exits 0."""
from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from .conftest import TINY_ARGS, start_server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_requests_then_exits_0(tiny_llama_dir, tmp_path, sig):
    server = start_server([tiny_llama_dir, *TINY_ARGS], tmp_path)
    # Long enough that the stream outlives uvicorn noticing the signal (it polls every 0.1 s): with
    # fast CPU kernels 40 tokens of the tiny model could finish before the listener closed.
    max_tokens = 300
    body = {"prompt": "Finish me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    texts, finish, refused = [], None, threading.Event()
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                texts.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if len(texts) == 2:  # mid-stream: ask the server to stop
                    server.proc.send_signal(sig)
                    threading.Thread(target=_expect_refusal, args=(server.url, refused), daemon=True).start()
            # While the stream was still running, new connections were already refused.
            assert refused.is_set(), "a new connection was accepted during the shutdown"
        assert finish == "length" and len(texts) == max_tokens  # the in-flight request ran to its end
        assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def _expect_refusal(url: str, refused: threading.Event) -> None:
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            refused.set()
            return
        threading.Event().wait(0.01)


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError) as info:  # start_server raises when the process exits before ready
        start_server([str(missing)], tmp_path, timeout=120)
    assert "exited with 1" in str(info.value) and "failed to load" in str(info.value)
