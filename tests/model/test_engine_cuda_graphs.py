"""Decode graphs through the whole engine on the tiny random model, on a CPU: the runner's graph path
with the capture stand-in (cuda_graphs.eager_capture: each replay reruns the recorded forward over
the persistent buffers, host copies of the metadata frozen at capture) against plain eager steps,
attention through torch_ref in both, float32. What a GPU adds (the capture itself) is not run here.

Not bit-identical, and cannot be on this CPU: padding changes the row count of every matmul, and
MKL's float32 GEMM rounds a row differently at another M (measured: 5 rows alone vs padded to 8,
K=128); torch_ref's decode graph attends over the whole table, and SDPA's sums move when masked
keys come along (~1e-7). Measured here: greedy tokens identical, max |logprob diff| 1.5e-5, KV
slots within 2.2e-6."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.attention.torch_ref import TorchAttentionBackend
from kvserve.cli import add_engine_args, engine_kwargs
from kvserve.config import CompilationConfig
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.worker import cuda_graphs, model_runner

SENTINEL = 3.0  # both engines' caches start as this (finite, as torch_ref needs): a slot still
# holding it was never written
SHARED = "A shared system prompt, long enough to fill more than two blocks of sixteen tokens each. "
# (step at which it joins, max_tokens): 3 decode at first, 5 once two join, 9 after four more join
# (past the largest captured size, 8), and as they finish 8 .. 1; the runner's rows move each time.
PLAN = [(0, 40), (0, 9), (0, 14), (5, 12), (5, 22), (12, 16), (12, 9), (12, 20), (12, 11), (12, 6)]


def make_engine(tiny_llama_dir, monkeypatch, graphs: bool) -> LLMEngine:
    monkeypatch.setattr(model_runner, "get_attention_backend", lambda device, dtype: TorchAttentionBackend())
    if graphs:
        monkeypatch.setattr(model_runner, "graph_capture_for", lambda config, backend: cuda_graphs.eager_capture)
    args = EngineArgs(tiny_llama_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, max_num_seqs=16)
    config = dataclasses.replace(args.create_engine_config(), compilation=CompilationConfig(max_cudagraph_capture_size=8))
    engine = LLMEngine(config)
    monkeypatch.undo()
    for cache in engine.runner.kv_caches:
        cache.fill_(SENTINEL)
    return engine


def run_plan(engine: LLMEngine) -> dict[str, tuple[list[int], list[dict[int, float]]]]:
    """The plan's requests, joining at their steps: req id -> (greedy tokens, top-2 logprobs per token)."""
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=2, ignore_eos=True) for _, n in PLAN]
    results, step = {}, 0
    while step == 0 or engine.has_unfinished_requests():
        for i, (join, _) in enumerate(PLAN):
            if join == step:
                engine.add_request(str(i), SHARED + f"question {i} " * (i % 3 + 1), params[i])
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                results[out.request_id] = (c.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in c.logprobs])
        step += 1
    return results


def test_decode_graphs_give_the_eager_engines_tokens_and_write_only_their_slots(tiny_llama_dir, monkeypatch):
    eager = make_engine(tiny_llama_dir, monkeypatch, graphs=False)
    assert eager.runner.graphs is None  # a CPU engine never captures
    graphed = make_engine(tiny_llama_dir, monkeypatch, graphs=True)
    graphs = graphed.runner.graphs
    assert graphs.sizes == [1, 2, 4, 8]
    steps = []  # (requests, most query tokens of one, the size replayed or None: eager)
    run = graphs.run

    def recording_run(batch):
        steps.append((len(batch.query_lens), max(batch.query_lens), graphs.size_for(batch)))
        return run(batch)

    graphs.run = recording_run
    expected, got = run_plan(eager), run_plan(graphed)

    assert sorted(got) == sorted(expected) == [str(i) for i in range(len(PLAN))]
    for req_id, (ids, logprobs) in expected.items():
        assert got[req_id][0] == ids, req_id
        for want, have in zip(logprobs, got[req_id][1]):
            assert want.keys() == have.keys()
            torch.testing.assert_close(torch.tensor(list(have.values())), torch.tensor(list(want.values())),
                                       atol=1e-4, rtol=0)  # fmt: skip
    decode_steps = {(n, size) for n, q, size in steps if q == 1}
    assert {(1, 1), (3, 4), (5, 8), (9, None)} <= decode_steps  # 9 > 8: eager
    assert all(size is None for _, q, size in steps if q > 1)  # steps with prompt tokens: eager
    assert graphed.scheduler.kv.stats.hits == eager.scheduler.kv.stats.hits > 0  # prefix caching on

    num_blocks = eager.runner.kv_caches[0].shape[1]
    for want, have in zip(eager.runner.kv_caches, graphed.runner.kv_caches):
        assert have.shape[1] == num_blocks + 1  # the scratch block, past the pool's ids
        pool = have[:, :num_blocks]
        # Exactly the slots eager steps wrote were written: padding rows wrote no request's block ...
        assert torch.equal(pool == SENTINEL, want == SENTINEL)
        torch.testing.assert_close(pool, want, atol=1e-5, rtol=0)
        # ... but the scratch block's first slot (zeroed at capture, then the sentinel here).
        scratch = have[:, num_blocks]  # [2, block_size, Hkv, D]
        assert (scratch[:, 0] != SENTINEL).all() and (scratch[:, 1:] == SENTINEL).all()


def test_enforce_eager_reaches_the_engine_config(tiny_llama_dir):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for argv, expected in (([tiny_llama_dir], False), ([tiny_llama_dir, "--enforce-eager"], True)):
        kwargs = engine_kwargs(parser.parse_args(argv))
        assert EngineArgs(**kwargs).create_engine_config().compilation == CompilationConfig(enforce_eager=expected)
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, enforce_eager=True)
    assert llm.llm_engine.config.compilation.enforce_eager and llm.llm_engine.runner.graphs is None


def test_a_capture_that_fails_leaves_the_engine_eager(tiny_llama_dir, monkeypatch, caplog):
    def failing_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(model_runner, "get_attention_backend", lambda device, dtype: TorchAttentionBackend())
    monkeypatch.setattr(model_runner, "graph_capture_for", lambda config, backend: failing_capture)
    with caplog.at_level("WARNING"):
        llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    assert llm.llm_engine.runner.graphs is None
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in caplog.text and "--enforce-eager" in caplog.text
    [out] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
