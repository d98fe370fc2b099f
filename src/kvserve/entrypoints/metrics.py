"""Prometheus metrics (`GET /metrics`) and the periodic stats line on stderr.

ServerMetrics is the AsyncLLM's EngineObserver: every method runs on the engine thread, right after the
event it reports, so timestamps are the engine's own. prometheus-client metrics are thread-safe, so the
HTTP thread renders them while the engine thread updates them. Per-request timings (`_timings`) are
engine-thread state. Times are time.monotonic(), the clock of the requests' arrival_time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from kvserve.engine.llm_engine import LLMEngine
from kvserve.outputs import RequestOutput

logger = logging.getLogger("kvserve.stats")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no `*_created` series: they double the output and nobody reads them

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class _Timing:
    arrival: float
    scheduled: bool = False  # has been in a step's batch
    last_token: Optional[float] = None  # end of the step that produced the latest token


class ServerMetrics:
    def __init__(self, log_interval: float = 5.0) -> None:
        self.registry = r = CollectorRegistry()
        self.log_interval = log_interval
        p = "kvserve:"

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(p + name, doc, registry=r, buckets=buckets)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(p + name, doc, registry=r)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(p + name, doc, labels, registry=r)  # exposed as <name>_total

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between a request's outputs.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        self.batch_size = histogram("iteration_batch_size", "Requests in one engine step.", _BATCH_BUCKETS)
        self.step_time = histogram("engine_step_seconds", "Duration of one engine step.", _LATENCY_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a batch slot.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.kv_blocks = gauge("kv_blocks_in_use", "KV-cache blocks held by requests.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.success = counter("request_success", "Requests finished.", ["finished_reason"])
        self.aborted = counter("requests_aborted", "Requests aborted (client gone, shutdown).")
        for reason in ("stop", "length"):
            self.success.labels(reason)  # show zero rather than nothing
        # Engine-thread state.
        self._timings: dict[str, _Timing] = {}
        self._prefix_seen = (0, 0)  # cumulative (queries, hits) already counted
        self._window = _StatsWindow()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- EngineObserver (engine thread) -----------------------------------------------------------
    def on_added(self, request_id: str, arrival_time: float) -> None:
        self._timings[request_id] = _Timing(arrival_time)

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput], start: float, end: float) -> None:
        self.step_time.observe(end - start)
        # n > 1 requests run as child ids; for them "scheduled" is first seen at their first output.
        running_ids = {r.request_id for r in engine.scheduler.running} | {o.request_id for o in outputs}
        for request_id, timing in self._timings.items():
            if not timing.scheduled and request_id in running_ids:
                timing.scheduled = True
                self.queue_time.observe(max(start - timing.arrival, 0.0))
        num_finished = prompt_tokens = generated = 0
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            if new_tokens:
                generated += new_tokens
                if timing.last_token is None:
                    self.ttft.observe(end - timing.arrival)
                    prompt_tokens += len(out.prompt_token_ids)
                else:
                    self.itl.observe(end - timing.last_token)
                timing.last_token = end
            if out.finished:
                num_finished += 1
                self.e2e.observe(end - timing.arrival)
                self.success.labels(out.outputs[0].finish_reason or "stop").inc()
                del self._timings[out.request_id]
        # Requests still running plus those that finished in this step: the step's batch.
        self.batch_size.observe(engine.scheduler.num_running + num_finished)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self._window.add(start, end, prompt_tokens, generated)
        if self.log_interval > 0 and self._window.elapsed(end) >= self.log_interval:
            self._log_stats(engine, end)

    def on_aborted(self, outputs: list[RequestOutput]) -> None:
        self.aborted.inc(len(outputs))
        for out in outputs:
            self._timings.pop(out.request_id, None)

    def on_state(self, engine: LLMEngine) -> None:
        scheduler = engine.scheduler
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_usage.set(scheduler.kv.usage)
        self.kv_blocks.set(scheduler.kv.num_blocks_in_use())
        stats = scheduler.kv.stats
        seen_queries, seen_hits = self._prefix_seen
        self.prefix_queries.inc(max(stats.queries - seen_queries, 0))
        self.prefix_hits.inc(max(stats.hits - seen_hits, 0))
        self._prefix_seen = (stats.queries, stats.hits)

    def _log_stats(self, engine: LLMEngine, now: float) -> None:
        scheduler = engine.scheduler
        seconds = max(self._window.elapsed(now), 1e-9)
        stats = scheduler.kv.stats
        logger.info(
            "running: %d reqs, waiting: %d reqs, KV cache usage: %.1f%%, prompt throughput: %.1f tokens/s, "
            "generation throughput: %.1f tokens/s, prefix cache hit rate: %.1f%%",
            scheduler.num_running, scheduler.num_waiting, 100 * scheduler.kv.usage,
            self._window.prompt_tokens / seconds, self._window.generated / seconds, 100 * stats.hit_rate,
        )  # fmt: skip
        self._window.reset(now)


class _StatsWindow:
    """Token counts since the last stats line. A step after an idle gap starts a new window, so that
    rates are over busy time and the first line after a pause is not an average over the pause."""

    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.last_end = 0.0
        self.prompt_tokens = self.generated = 0

    def add(self, start: float, end: float, prompt_tokens: int, generated: int) -> None:
        if self.start is None or start - self.last_end > 1.0:
            self.reset(start)
        self.prompt_tokens += prompt_tokens
        self.generated += generated
        self.last_end = end

    def elapsed(self, now: float) -> float:
        return 0.0 if self.start is None else now - self.start

    def reset(self, now: float) -> None:
        self.start, self.prompt_tokens, self.generated = now, 0, 0
