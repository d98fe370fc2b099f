"""AsyncLLM without HTTP, on the tiny model: requests from concurrent coroutines share steps, an abort is
applied before the next step, the engine's own validation reaches the caller, and nothing leaks."""
from __future__ import annotations

import asyncio

import pytest

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.async_engine import AsyncLLM, EngineNotReadyError, QueueFullError
from kvserve.sampling_params import RequestOutputKind, SamplingParams


class Recorder:
    """An EngineObserver that remembers, per step, the batch size and the KV blocks in use."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.blocks_in_use: list[int] = []
        self.aborted_after_step: list[int] = []  # number of steps run when each abort was applied

    def on_added(self, request_id, arrival_time) -> None:
        pass

    def on_step(self, engine, outputs, start, end) -> None:
        self.batch_sizes.append(engine.scheduler.num_running + sum(o.finished for o in outputs))
        self.blocks_in_use.append(engine.scheduler.kv.num_blocks_in_use())

    def on_aborted(self, outputs) -> None:
        self.aborted_after_step += [len(self.batch_sizes)] * len(outputs)

    def on_state(self, engine) -> None:
        self.blocks_now = engine.scheduler.kv.num_blocks_in_use()


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, output_kind=RequestOutputKind.DELTA)


def run(tiny_llama_dir, body, max_queued_requests=None):
    async def main():
        recorder = Recorder()
        args = EngineArgs(model=tiny_llama_dir, dtype="float32", kv_cache_memory_bytes=16 << 20, max_num_seqs=16)
        engine = AsyncLLM(args, observer=recorder, max_queued_requests=max_queued_requests)
        with pytest.raises(EngineNotReadyError):
            await engine.add_request("early", "Hi", params(1))  # before start(): still "loading"
        engine.start()
        await engine.wait_until_ready()
        try:
            await body(engine, recorder)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_concurrent_requests_share_steps_and_free_their_blocks(tiny_llama_dir):
    async def body(engine, recorder):
        async def one(i):
            stream = await engine.add_request(f"r{i}", f"Request {i}", params(8))
            return [len(out.outputs[0].token_ids) async for out in stream]

        results = await asyncio.gather(*(one(i) for i in range(8)))
        assert all(sum(counts) == 8 for counts in results)
        assert max(recorder.batch_sizes) == 8  # all eight clients in one step
        assert len(recorder.batch_sizes) <= 8 + 2  # not 64 steps: they ran together
        await asyncio.sleep(0.05)
        assert recorder.blocks_now == 0

    run(tiny_llama_dir, body)


def test_abort_is_applied_before_the_next_step(tiny_llama_dir):
    async def body(engine, recorder):
        keep = await engine.add_request("keep", "Keep going", params(40))
        leave = await engine.add_request("leave", "Leave soon", params(40))
        async for _ in leave:
            if len(recorder.batch_sizes) >= 3:
                break
        steps_when_aborted = len(recorder.batch_sizes)
        leave.abort()
        async for out in keep:
            pass
        assert out.outputs[0].finish_reason == "length"
        # Applied after at most the one step that was running when abort() was called.
        assert recorder.aborted_after_step and recorder.aborted_after_step[0] - steps_when_aborted <= 1
        assert recorder.blocks_now == 0

    run(tiny_llama_dir, body)


def test_engine_validation_reaches_the_caller_and_queues_nothing(tiny_llama_dir):
    async def body(engine, recorder):
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("too-long", "Hi", params(10_000))
        with pytest.raises(ValueError, match="already in use"):
            stream = await engine.add_request("dup", "Hi", params(30))
            await engine.add_request("dup", "Hi", params(30))
        stream.abort()
        ok = await engine.add_request("too-long", "Hi", params(2))  # the failed id was not kept
        assert [o.finished async for o in ok][-1]

    run(tiny_llama_dir, body)


def test_queue_limit(tiny_llama_dir):
    async def body(engine, recorder):
        # Both adds are in flight before the engine thread acknowledges either: the second is refused.
        first = asyncio.create_task(engine.add_request("a", "Hi", params(2)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.add_request("b", "Hi", params(2))
        stream = await first
        assert [o.finished async for o in stream][-1]

    run(tiny_llama_dir, body, max_queued_requests=1)
