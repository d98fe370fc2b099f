"""compare.py's results -> its two markdown tables, each followed by the targets the issues set for it
(checked against this run, not asserted)."""
from __future__ import annotations

from engines import TAKES_PART, Settings
from report import Row, render_table

Results = dict[str, dict[str, dict | str]]  # results[stage][engine]


def _get(results: Results, stage: str, engine: str, *keys: str) -> float | str:
    """A number of results[stage][engine][keys...], or why there is none: "–" (does not take part),
    "n/a" (not run), or the stage's own reason ("failed", "not available", "n/a (native is avx2)")."""
    if engine not in TAKES_PART[stage]:
        return "–"
    value = results.get(stage, {}).get(engine)
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else value
    return "n/a" if value is None else value


def _num(value: float | str) -> float | None:
    return value if isinstance(value, (int, float)) else None


def _target(text: str, value: float | None, goal: float, at_most: bool, unit: str = "x") -> str:
    if value is None:
        return f"- {text}: not measured"
    met = value <= goal if at_most else value >= goal
    shown = f"{value:.2f}x" if unit == "x" else f"{value:,.0f} {unit}"
    return f"- {text}: {shown}, {'met' if met else 'not met'}"


# -- the bf16 table: kvserve (native, AVX2) vs vLLM ----------------------------------------------------


def main_table(results: Results, s: Settings, native: str) -> str:
    engines = ["kvserve", "kvserve-avx2", "vllm"]
    if native in ("avx2", "neon", "none"):
        engines.remove("kvserve-avx2")

    def pick(stage: str, *keys: str) -> dict[str, float | str]:
        return {e: _get(results, stage, e, *keys) for e in engines}

    n_a, n_b, n_p = s.throughput_prompts, s.prefix_prompts, s.prompt_prompts
    rows = [
        Row(f"(a) offline {n_a}x256/128: output tok/s", pick("a", "output_tok_s"), True),
        Row(f"(a) offline {n_a}x256/128: total tok/s", pick("a", "total_tok_s"), True),
        Row(f"(b) shared prefix {n_b}x(1024+64)/64: output tok/s", pick("b", "output_tok_s"), True),
        Row(f"(b) shared prefix {n_b}x(1024+64)/64: total tok/s", pick("b", "total_tok_s"), True),
        Row(f"(p) prompt processing {n_p}x1024/1: prompt tok/s", pick("p", "prompt_tok_s"), True),
    ]
    for concurrency, prompts in s.serve_prompts:
        tag = f"(c) served c={concurrency} ({prompts} req)"
        rows += [
            Row(f"{tag}: output tok/s", pick("c", f"c{concurrency}", "output_throughput"), True),
            Row(f"{tag}: median TTFT ms", pick("c", f"c{concurrency}", "median_ttft_ms"), False),
            Row(f"{tag}: median TPOT ms", pick("c", f"c{concurrency}", "median_tpot_ms"), False),
        ]
    rows += [
        Row("(d) cold start, fresh caches: s", pick("d", "startup_fresh_s"), False),
        Row("(d) cold start, warm caches: s", pick("c", "startup_warm_s"), False),
    ]
    names = {"kvserve": f"kvserve ({native})", "kvserve-avx2": "kvserve AVX2", "vllm": "vLLM"}
    columns: list = [*engines, ("kvserve", "vllm")]
    if "kvserve-avx2" in engines:
        columns += [("kvserve-avx2", "vllm"), ("kvserve-avx2", "kvserve")]
    table = render_table(rows, columns, names)
    if "kvserve-avx2" not in engines:
        return table
    return table + "\n\n" + _avx2_targets(results)


def _avx2_targets(results: Results) -> str:
    """Issue 14's targets for the AVX2 level."""

    def ratio(stage: str, num: str, den: str, *keys: str) -> float | None:
        a, b = _num(_get(results, stage, num, *keys)), _num(_get(results, stage, den, *keys))
        return a / b if a is not None and b else None

    prompt = _num(_get(results, "p", "kvserve-avx2", "prompt_tok_s"))
    lines = [
        "Targets at the AVX2 level (issue 14; from this run, not asserted):",
        _target("c=1 median TPOT, AVX2 / native, at most 1.25x",
                ratio("c", "kvserve-avx2", "kvserve", "c1", "median_tpot_ms"), 1.25, at_most=True),
        _target("(p) prompt tok/s at least 5x the ~70 tok/s seen before, 350", prompt, 350, False, "tok/s"),
        _target("c=16 output tok/s at least 1.5x vLLM's, AVX2 / vLLM",
                ratio("c", "kvserve-avx2", "vllm", "c16", "output_throughput"), 1.5, at_most=False),
        _target("c=64 output tok/s at least 1.5x vLLM's, AVX2 / vLLM",
                ratio("c", "kvserve-avx2", "vllm", "c64", "output_throughput"), 1.5, at_most=False),
    ]  # fmt: skip
    return "\n".join(lines)


# -- the GGUF table: kvserve vs llama-server (and kvserve on the bf16 folder, from (c)) ---------------


def gguf_table(results: Results, s: Settings) -> str:
    def g(engine: str, quant: str, *keys: str) -> float | str:
        return _get(results, "g", engine, quant, *keys)

    def pick(quant: str, concurrency: int | None, key: str) -> dict[str, float | str]:
        keys = (f"c{concurrency}", key) if concurrency else (key,)
        return {"kvserve": g("kvserve", quant, *keys), "llamacpp": g("llamacpp", quant, *keys), "vllm": "n/a",
                "kvserve-bf16": _get(results, "c", "kvserve", *keys)}  # fmt: skip

    rows = []
    for quant, loads in (("q4_1", s.gguf_prompts), ("q8_0", s.gguf_prompts[:1])):
        for concurrency, prompts in loads:
            tag = f"(g) {quant.upper()} served c={concurrency} ({prompts} req)"
            rows += [
                Row(f"{tag}: output tok/s", pick(quant, concurrency, "output_throughput"), True),
                Row(f"{tag}: median TTFT ms", pick(quant, concurrency, "median_ttft_ms"), False),
                Row(f"{tag}: median TPOT ms", pick(quant, concurrency, "median_tpot_ms"), False),
            ]
        rows += [
            Row(f"(g) {quant.upper()} weights kept as", pick(quant, None, "weights_form"), None),
            Row(f"(g) {quant.upper()} weight memory MiB", pick(quant, None, "weights_mib"), False),
            Row(f"(g) {quant.upper()} server RSS after load MiB", pick(quant, None, "rss_mib"), False),
        ]
    startup = dict(pick("q4_1", None, "startup_s"), **{"kvserve-bf16": _get(results, "c", "kvserve", "startup_warm_s")})
    rows.append(Row("(g) Q4_1 start-up to first answer: s", startup, False))
    names = {"kvserve": "kvserve", "llamacpp": "llama-server", "vllm": "vLLM", "kvserve-bf16": "kvserve bf16 (c)"}
    columns = ["kvserve", "llamacpp", ("kvserve", "llamacpp"), "vllm", "kvserve-bf16", ("kvserve", "kvserve-bf16")]
    table = render_table(rows, columns, names)
    return table + "\n\n" + _gguf_targets(results)


def _gguf_targets(results: Results) -> str:
    """Issue 15's targets for kvserve on the Q4_1 file."""

    def ratio(*keys: str) -> float | None:
        a, b = _num(_get(results, "g", "kvserve", "q4_1", *keys)), _num(_get(results, "g", "llamacpp", "q4_1", *keys))
        return a / b if a is not None and b else None

    lines = [
        "Targets for Q4_1 (issue 15; from this run, not asserted), kvserve / llama-server:",
        _target("c=1 output tok/s at least 1.2x", ratio("c1", "output_throughput"), 1.2, at_most=False),
        _target("c=16 output tok/s at least 2x", ratio("c16", "output_throughput"), 2.0, at_most=False),
        _target("c=1 median TTFT no worse (at most 1x)", ratio("c1", "median_ttft_ms"), 1.0, at_most=True),
        _target("c=16 median TTFT no worse (at most 1x)", ratio("c16", "median_ttft_ms"), 1.0, at_most=True),
        _target("weight memory at most llama-server's + 20% (1.2x)", ratio("weights_mib"), 1.2, at_most=True),
    ]
    form = _get(results, "g", "kvserve", "q4_1", "weights_form")
    if isinstance(form, str) and form.startswith("RSS"):
        lines[-1] += " (kvserve's figure is its whole RSS, KV cache included: its log had no weight line)"
    for engine, name in (("kvserve", "kvserve"), ("llamacpp", "llama-server")):
        for quant in ("q4_1", "q8_0"):
            for concurrency in (1, 16):
                run = _get(results, "g", engine, quant, f"c{concurrency}")
                if isinstance(run, dict) and run.get("failed"):
                    lines.append(
                        f"- {name} {quant.upper()} c={concurrency}: {run['completed']} of {run['num_prompts']} requests"
                        f" completed ({run['failed']} failed, see its log); its figures are over the completed ones"
                    )
    return "\n".join(lines)
