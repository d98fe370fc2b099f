"""Many clients at once on the tiny model: continuous batching across clients, client disconnects
freeing their KV blocks, the metrics that show both, and the OpenAPI document."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

REQUIRED_METRICS = [
    "kvserve:time_to_first_token_seconds_count", "kvserve:inter_token_latency_seconds_count",
    "kvserve:e2e_request_latency_seconds_count", "kvserve:request_queue_time_seconds_count",
    "kvserve:num_requests_running", "kvserve:num_requests_waiting", "kvserve:kv_cache_usage_perc",
    "kvserve:kv_blocks_in_use", "kvserve:prompt_tokens_total", "kvserve:generation_tokens_total",
    "kvserve:prefix_cache_queries_total", "kvserve:prefix_cache_hits_total",
    'kvserve:request_success_total{finished_reason="length"}', "kvserve:requests_aborted_total",
]  # fmt: skip


def stream_body(prompt: str, max_tokens: int) -> dict:
    return {
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


async def read_stream(client: httpx.AsyncClient, body: dict, stop_after: int | None = None) -> dict:
    """Consume one streamed completion; with stop_after, close the connection after that many text chunks."""
    chunks, usage, finish = 0, None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                chunks += 1
                finish = event["choices"][0]["finish_reason"] or finish
            usage = event.get("usage") or usage
            if stop_after is not None and chunks >= stop_after:
                return {"chunks": chunks, "closed": True}
    return {"chunks": chunks, "usage": usage, "finish_reason": finish, "closed": False}


def batch_histogram(metrics: dict[str, float]) -> dict[str, float]:
    prefix = 'kvserve:iteration_batch_size_bucket{le="'
    return {k[len(prefix) : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_64_concurrent_streams_share_the_running_batch(tiny_server):
    before = tiny_server.metrics()

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:
            bodies = [stream_body(f"Client number {i} says hello", 16) for i in range(64)]
            return await asyncio.gather(*(read_stream(client, b) for b in bodies))

    results = asyncio.run(main())
    assert all(r["usage"]["completion_tokens"] == 16 and r["finish_reason"] == "length" for r in results)
    after = tiny_server.metrics()
    ttft_count = "kvserve:time_to_first_token_seconds_count"
    assert after[ttft_count] - before[ttft_count] == 64
    assert after["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == 64 * 16
    # Proof of batching across clients: steps whose batch held more than 8 (even more than 32) requests.
    hist_before, hist_after = batch_histogram(before), batch_histogram(after)
    steps = {le: hist_after[le] - hist_before.get(le, 0.0) for le in hist_after}
    assert steps["+Inf"] - steps["8.0"] > 0, steps
    assert steps["+Inf"] - steps["32.0"] > 0, steps
    # 64 requests x 16 tokens took far fewer steps than one request at a time would.
    assert steps["+Inf"] < 64 * 16 / 4, steps
    assert after["kvserve:kv_blocks_in_use"] == 0


def test_disconnected_streams_are_aborted_and_free_their_blocks(tiny_server):
    idle_blocks = tiny_server.metrics()["kvserve:kv_blocks_in_use"]
    aborted_before = tiny_server.metrics()["kvserve:requests_aborted_total"]
    seen_while_running = {}

    async def watch_aborts():
        """Poll /metrics until the 8 aborts show; record how many requests still ran at that moment."""
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=30) as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                m = await tiny_server.ametrics(client)
                if m["kvserve:requests_aborted_total"] - aborted_before >= 8:
                    seen_while_running.update(running=m["kvserve:num_requests_running"], t=time.monotonic())
                    return
                await asyncio.sleep(0.02)

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:
            # 128 tokens: the kept streams must outlast the aborts by many steps even with fast kernels.
            bodies = [stream_body(f"Stream {i} of sixteen", 128) for i in range(16)]
            tasks = [read_stream(client, b, stop_after=3 if i % 2 else None) for i, b in enumerate(bodies)]
            watcher = asyncio.create_task(watch_aborts())
            results = await asyncio.gather(*tasks)
            await watcher
            return results

    results = asyncio.run(main())
    closed = [r for r in results if r["closed"]]
    finished = [r for r in results if not r["closed"]]
    assert len(closed) == 8 and len(finished) == 8
    assert all(r["usage"]["completion_tokens"] == 128 and r["finish_reason"] == "length" for r in finished)
    # The 8 aborts landed while the other 8 were still generating (they had ~125 steps to go).
    assert seen_while_running, "the aborts never showed in /metrics"
    assert seen_while_running["running"] >= 1
    after = tiny_server.metrics()
    assert after["kvserve:requests_aborted_total"] - aborted_before == 8
    assert after["kvserve:kv_blocks_in_use"] == idle_blocks
    assert after["kvserve:num_requests_running"] == 0 and after["kvserve:num_requests_waiting"] == 0


def test_metrics_exposes_every_required_series(tiny_server):
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in REQUIRED_METRICS:
        assert f"\n{name} " in text or text.startswith(f"{name} "), name
    assert "# TYPE kvserve:time_to_first_token_seconds histogram" in text
    assert "# TYPE kvserve:kv_blocks_in_use gauge" in text
    assert "# TYPE kvserve:requests_aborted_total counter" in text


def test_stats_line_is_logged_while_busy(tiny_server):
    # This server logs every 1 s while busy: keep it busy (sequential long completions) until a
    # stats line shows up, bounded by a deadline.
    def stats_lines():
        return [line for line in tiny_server.log().splitlines() if "kvserve.stats" in line]

    body = {"prompt": "Keep going", "max_tokens": 200, "ignore_eos": True, "temperature": 0.0}
    deadline = time.monotonic() + 60
    while not stats_lines() and time.monotonic() < deadline:
        response = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    lines = stats_lines()
    assert lines, tiny_server.log()[-2000:]
    assert "running:" in lines[-1] and "KV cache usage" in lines[-1] and "generation throughput" in lines[-1]


@pytest.mark.parametrize(
    "path",
    ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/tokenize", "/detokenize",
     "/generate", "/generate_stream", "/info", "/metrics"],
)  # fmt: skip
def test_openapi_describes_every_route(tiny_server, path):
    spec = httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert path in spec["paths"]
    for operation in spec["paths"][path].values():
        if "requestBody" in operation:  # request bodies are documented schemas, not free-form JSON
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert "$ref" in schema
