"""`kvserve bench serve`: load a running server like `vllm bench serve` does.

Random dataset: N prompts of exactly --input-len random token ids (no special tokens), each asking for
exactly --output-len tokens (ignore_eos, greedy), streamed from /v1/completions. Requests start at
--request-rate per second (Poisson arrivals; inf: all at once), at most --max-concurrency at a time.
Prints TTFT / ITL / end-to-end latency (mean, p50, p99) and throughput. With --launch, it first starts
`kvserve serve` itself and reports the time from launch to the first answered request.
With --structured-json SCHEMA_FILE, a --constrained-fraction of the requests (spread evenly) follow that
JSON schema (vLLM's structured_outputs); they may end early (the grammar completes), so output tokens
are counted as served, and constrained and unconstrained requests are also reported apart. A schema
that cannot be completed in --output-len tokens (e.g. an array with minItems) keeps lengths equal.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the random prompts (default: the server's model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", choices=("random",), default="random")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=128)
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch", action="store_true", help="start `kvserve serve` on HOST:PORT first, stop it after")
    p.add_argument("--serve-args", default="", help="extra `kvserve serve` arguments with --launch, one string")
    p.add_argument("--structured-json", default=None, metavar="SCHEMA_FILE",
                   help="a JSON schema file: constrained requests follow it")
    p.add_argument("--constrained-fraction", type=float, default=1.0,
                   help="with --structured-json: the share of requests constrained (default: all)")


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""
    constrained: bool = False


def run(args: argparse.Namespace) -> None:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    server, startup = None, None
    if args.launch:
        server, startup = _launch(args, base_url)
    try:
        asyncio.run(_main(args, base_url, startup))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


async def _main(args: argparse.Namespace, base_url: str, startup: Optional[float]) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits) as client:
        card = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        model = args.model or card["id"]
        prompts = _random_prompts(args, args.tokenizer or card["root"])
        constraints = _constraints(args)
        await _one(client, args.endpoint, model, prompts[0], 4)  # warm-up
        if any(constraints):  # the grammar compiles once, before the clock starts
            await _one(client, args.endpoint, model, prompts[0], 4, next(c for c in constraints if c))
        semaphore = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
        rng = random.Random(args.seed)

        async def limited(prompt: list[int], constraint: Optional[dict]) -> RequestResult:
            async with semaphore:
                return await _one(client, args.endpoint, model, prompt, args.output_len, constraint)

        t0 = time.perf_counter()
        tasks = []
        for prompt, constraint in zip(prompts, constraints):
            tasks.append(asyncio.create_task(limited(prompt, constraint)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    _report(args, model, results, duration, startup)


def _random_prompts(args: argparse.Namespace, tokenizer_path: str) -> list[list[int]]:
    from kvserve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    special = set(tokenizer.all_special_ids)
    allowed = [t for t in range(len(tokenizer)) if t not in special]
    rng = random.Random(args.seed)
    return [[rng.choice(allowed) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


def _constraints(args: argparse.Namespace) -> list[Optional[dict]]:
    """Per request: the structured_outputs object it sends, or None. Constrained requests are spread
    evenly: request i is constrained when floor((i + 1) * f) > floor(i * f)."""
    if args.structured_json is None:
        return [None] * args.num_prompts
    with open(args.structured_json) as f:
        constraint = {"json": json.load(f)}
    frac = args.constrained_fraction
    return [constraint if int((i + 1) * frac) > int(i * frac) else None for i in range(args.num_prompts)]


async def _one(
    client, endpoint: str, model: str, prompt: list[int], output_len: int, constraint: Optional[dict] = None
) -> RequestResult:
    body = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if constraint is not None:
        body["structured_outputs"] = constraint
    result = RequestResult(constrained=constraint is not None)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        # A constrained answer may end early (its grammar completes).
        result.ok = result.output_tokens == output_len or (result.constrained and result.output_tokens > 0)
        if not result.ok:
            result.error = f"got {result.output_tokens} tokens, expected {output_len}"
    except Exception as e:  # noqa: BLE001 - one failed request is a result, not a crash
        result.error = repr(e)
    return result


def _report(args, model: str, results: list[RequestResult], duration: float, startup: Optional[float]) -> None:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = len(ok) * args.input_len
    ms = lambda values: [1000 * v for v in values]  # noqa: E731

    def stats(title: str, short: str, values: list[float]) -> None:
        values = values or [float("nan")]
        print(f"{title:-^50}")
        for label, value in (("Mean", np.mean(values)), ("Median", np.percentile(values, 50)),
                             ("P99", np.percentile(values, 99))):  # fmt: skip
            print(f"{f'{label} {short} (ms):':<40}{value:>10.2f}")

    print(f"{' Serving Benchmark Result ':=^50}")
    rows = [
        ("Model:", model), ("Successful requests:", len(ok)), ("Failed requests:", len(results) - len(ok)),
        ("Request rate (req/s):", args.request_rate), ("Maximum request concurrency:", args.max_concurrency),
        ("Benchmark duration (s):", f"{duration:.2f}"), ("Total input tokens:", in_tokens),
        ("Total generated tokens:", out_tokens), ("Request throughput (req/s):", f"{len(ok) / duration:.2f}"),
        ("Output token throughput (tok/s):", f"{out_tokens / duration:.2f}"),
        ("Total token throughput (tok/s):", f"{(in_tokens + out_tokens) / duration:.2f}"),
    ]  # fmt: skip
    for label, value in rows:
        print(f"{label:<40}{value!s:>10}")
    stats("Time to First Token", "TTFT", ms([r.ttft for r in ok]))
    stats("Inter-token Latency", "ITL", ms([v for r in ok for v in r.itls]))
    stats("End-to-end Latency", "E2EL", ms([r.latency for r in ok]))
    if startup is not None:
        print(f"{'Startup to first answer (s):':<40}{startup:>10.2f}")
    if any(r.constrained for r in results):
        for title, group in (("constrained", [r for r in ok if r.constrained]),
                             ("unconstrained", [r for r in ok if not r.constrained])):  # fmt: skip
            itls = ms([v for r in group for v in r.itls]) or [float("nan")]
            print(f"{f' {len(group)} {title} ':-^50}")
            print(f"{'Output token throughput (tok/s):':<40}{sum(r.output_tokens for r in group) / duration:>10.2f}")
            print(f"{'Median ITL (ms):':<40}{np.percentile(itls, 50):>10.2f}")
    print("=" * 50)
    for r in results:
        if not r.ok:
            print(f"failed request: {r.error}", file=sys.stderr)
            break


def _launch(args: argparse.Namespace, base_url: str) -> tuple[subprocess.Popen, float]:
    """Start `kvserve serve`; returns it and the seconds from launch to its first answered completion."""
    import httpx

    log = tempfile.NamedTemporaryFile("w", prefix="kvserve-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--host", args.host, "--port", str(args.port)]
    cmd += shlex.split(args.serve_args)
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    print(f"launching: {shlex.join(cmd)} (log: {log.name})", flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"prompt": "Hello", "max_tokens": 1}
    while True:
        if server.poll() is not None:
            raise SystemExit(f"kvserve serve exited with status {server.returncode}; see {log.name}")
        try:
            if httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=30).status_code == 200:
                return server, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
