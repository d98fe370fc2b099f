"""A server configured from all three sources (file < environment < command line), with an API key and a
one-slot batch and queue: the key is enforced, a full queue answers 503 + Retry-After at once, and a
client that leaves before its first token is aborted."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from .conftest import TINY_ARGS, start_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("restricted-server")
    config = folder / "server.yaml"
    config.write_text("served-model-name: [from-file]\nmax-num-seqs: 1\nmax_queued_requests: 5\n")
    template = folder / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    env = {"KVSERVE_API_KEY": KEY, "KVSERVE_SERVED_MODEL_NAME": "from-env", "KVSERVE_MAX_QUEUED_REQUESTS": "3"}
    args = ["--config", str(config), "--max-queued-requests", "1", "--chat-template", str(template),
            "--allowed-origins", "http://app.example"]  # fmt: skip
    srv = start_server([tiny_llama_dir, *TINY_ARGS, *args], folder, env=env)
    yield srv
    assert srv.stop() == 0


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_config_sources_merge_with_command_line_first(server):
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["from-env"]  # environment beats the file
    # max-num-seqs 1 came from the file; max-queued-requests 1 from the command line (env said 3, file 5):
    # test_full_queue_answers_503_at_once shows both.


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/generate"),
     ("GET", "/info"), ("POST", "/tokenize"), ("GET", "/version"), ("GET", "/openapi.json")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_is_required(server, method, path, headers):
    response = httpx.request(method, f"{server.url}{path}", json={}, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_cors_preflight_needs_no_key_and_names_the_allowed_origin(server):
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(f"{server.url}/v1/completions", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(f"{server.url}/v1/completions", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_chat_template_flag_replaces_the_models_template(server):
    messages = [{"role": "user", "content": "Hi"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=AUTH).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=AUTH).json()["prompt"]
    assert text == "[user] Hi\n"


def test_openai_client_with_the_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    out = client.completions.create(model="from-env", prompt="Hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope").models.list()


async def _open_stream(client: httpx.AsyncClient, max_tokens: int):
    body = {"model": "from-env", "prompt": "Hold the slot", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip
    request = client.build_request("POST", "/v1/completions", json=body)
    return await client.send(request, stream=True)


async def _wait_for(server, client, name: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await server.ametrics(client))[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


def test_full_queue_answers_503_at_once_and_a_queued_client_can_leave(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            before = await server.ametrics(client)
            running = await _open_stream(client, 400)  # takes the one batch slot (max-num-seqs 1)
            lines = running.aiter_lines()
            while not (await lines.__anext__()).startswith("data: "):
                pass
            queued = await _open_stream(client, 4)  # takes the one queue slot (max-queued-requests 1)
            await _wait_for(server, client, "kvserve:num_requests_waiting", 1)
            t0 = time.monotonic()
            rejected = await client.post("/v1/completions", json={"prompt": "One too many", "max_tokens": 2})
            elapsed = time.monotonic() - t0
            assert rejected.status_code == 503 and elapsed < 5  # answered at once, not queued
            assert int(rejected.headers["Retry-After"]) >= 1
            assert rejected.json()["error"]["code"] == "queue_full"
            # The queued client leaves before its first token: it is aborted and leaves the queue.
            await queued.aclose()
            await _wait_for(server, client, "kvserve:num_requests_waiting", 0)
            await running.aclose()
            await _wait_for(server, client, "kvserve:num_requests_running", 0)
            after = await server.ametrics(client)
            assert after["kvserve:requests_aborted_total"] - before["kvserve:requests_aborted_total"] == 2
            assert after["kvserve:kv_blocks_in_use"] == before["kvserve:kv_blocks_in_use"]
            # And the server serves again.
            ok = await client.post("/v1/completions", json={"prompt": "Again", "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2

    asyncio.run(main())


def test_non_streaming_client_that_leaves_is_aborted(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            before = (await server.ametrics(client))["kvserve:requests_aborted_total"]
            body = {"prompt": "Long answer", "max_tokens": 400, "ignore_eos": True}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await _wait_for(server, client, "kvserve:num_requests_running", 1)
            task.cancel()  # closes the connection mid-request
            await _wait_for(server, client, "kvserve:requests_aborted_total", before + 1)
            await _wait_for(server, client, "kvserve:kv_blocks_in_use", 0)

    asyncio.run(main())


def test_stream_events_are_json(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH,
                      json={"prompt": "x", "max_tokens": 2, "stream": True}) as response:  # fmt: skip
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("choices" in json.loads(e) for e in events[:-1])
