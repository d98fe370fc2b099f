"""AsyncLLM: one LLMEngine driven by a dedicated thread, shared by many asyncio clients.

Ownership (the whole design rests on it):
- The engine thread owns the LLMEngine. Only it calls add_request / step / abort_request (the engine is
  not thread-safe), and it loads the model, so the HTTP server answers /health while weights load.
- The event-loop thread owns everything else here: the per-request RequestStreams and the admission
  counters. It never touches the engine.
- Loop -> engine: commands on `_commands` (a thread-safe queue), drained by the engine thread before every
  step. So a request added by any client joins the running batch at the next step, and an abort reaches
  the engine before its next step: the aborted request's KV blocks are free within one step.
- Engine -> loop: `loop.call_soon_threadsafe`, one callback per step carrying all of that step's outputs.

Torch releases the GIL inside its kernels, so the event loop keeps parsing, tokenizing and streaming while
a step runs (docs/architecture.md has the measurements behind choosing a thread over a process).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.inputs import PromptType
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


class QueueFullError(RuntimeError):
    """max_queued_requests requests are already waiting for a batch slot."""


class EngineObserver(Protocol):
    """Sees the engine from its own thread (metrics, stats logging). Read the engine, never change it."""

    def on_added(self, request_id: str, arrival_time: float) -> None: ...

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput], start: float, end: float) -> None: ...

    def on_aborted(self, outputs: list[RequestOutput]) -> None: ...

    def on_state(self, engine: LLMEngine) -> None: ...


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    future: asyncio.Future  # resolved on the loop: None, or the ValueError add_request raised


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # command: abort everything and end the engine thread


class RequestStream:
    """The outputs of one request, in order. Iterate it inside `async with`: leaving the block before
    the request finished (client gone, task cancelled, error) aborts the request in the engine."""

    def __init__(self, request_id: str, owner: "AsyncLLM") -> None:
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[Union[RequestOutput, BaseException]] = asyncio.Queue()

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Abort the request unless it finished; the stream then ends. Idempotent."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.abort()


class AsyncLLM:
    def __init__(
        self,
        engine_args: EngineArgs,
        observer: Optional[EngineObserver] = None,
        max_queued_requests: Optional[int] = None,
    ) -> None:
        self._args = engine_args
        self._observer = observer
        self.max_queued_requests = max_queued_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # Loop-thread state.
        self._streams: dict[str, RequestStream] = {}
        self._ready = asyncio.Event()
        self._error: Optional[BaseException] = None
        self._num_pending_adds = 0  # sent to the engine thread, not yet acknowledged
        self._num_waiting = 0  # engine's waiting queue, as of the last callback
        self.tokenizer: Any = None  # set when ready
        self.config: Any = None  # the frozen EngineConfig, set when ready
        self.structured_output: Any = None  # the engine's StructuredOutputManager (thread-safe), when ready
        self.load_seconds: Optional[float] = None

    # --- lifecycle (loop thread) ------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; it loads the model, then serves. Call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_thread, name="kvserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    async def wait_until_ready(self) -> None:
        """Returns once the model is loaded; raises EngineDeadError if loading failed."""
        await self._ready.wait()
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error!r}") from self._error

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running and stop the engine thread."""
        if self._thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)

    # --- requests (loop thread) -------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: Optional[float] = None,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises EngineNotReadyError / EngineDeadError / QueueFullError before anything is sent, and the
        engine's ValueError if it rejects the request (then nothing was queued). A request with a
        structured-output constraint first waits here for its grammar (compiled once, on the grammar
        threads): a constraint that does not compile is a ValueError, and the engine thread never waits."""
        self._check_usable()
        if params.structured_outputs is not None:
            compiled = self.structured_output.submit(params.structured_outputs)
            if not compiled.done():  # (a compiled one adds at once, with the requests sent beside it)
                # shielded: a client that leaves must not cancel a compile other requests share
                await asyncio.shield(asyncio.wrap_future(compiled))
            compiled.result()  # its ValueError, if it does not compile
        if self.max_queued_requests is not None and self.num_queued >= self.max_queued_requests:
            raise QueueFullError(f"{self.num_queued} requests are already waiting (max_queued_requests)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream  # before the command: outputs can only follow the ack
        future = asyncio.get_running_loop().create_future()
        self._num_pending_adds += 1
        self._commands.put(_Add(request_id, prompt, params, arrival_time or time.monotonic(), future))
        try:
            await future
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # cancelled while the add was in flight: it may have been queued
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent; unknown or finished ids are ignored). Safe from any thread."""
        self._commands.put(_Abort(request_id))

    @property
    def num_queued(self) -> int:
        """Requests accepted but not yet admitted to the running batch."""
        return self._num_pending_adds + self._num_waiting

    def _check_usable(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error!r}")
        if not self._ready.is_set():
            raise EngineNotReadyError("the model is still loading")

    # --- callbacks from the engine thread (run on the loop) ---------------------------------------
    def _post(self, callback, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def _on_ready(self, tokenizer: Any, config: Any, structured_output: Any, seconds: float) -> None:
        self.tokenizer, self.config, self.load_seconds = tokenizer, config, seconds
        self.structured_output = structured_output
        self._ready.set()

    def _on_failed(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine failed: {error!r}"))
        self._streams.clear()

    def _on_added(self, future: asyncio.Future, error: Optional[BaseException], num_waiting: int) -> None:
        self._num_pending_adds -= 1
        self._num_waiting = num_waiting
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(None)

    def _on_outputs(self, outputs: list[RequestOutput], num_waiting: int) -> None:
        self._num_waiting = num_waiting
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # its client already left; the abort is on its way
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    # --- the engine thread --------------------------------------------------------------------------
    def _engine_thread(self) -> None:
        t0 = time.perf_counter()
        try:
            engine = LLMEngine.from_engine_args(self._args)
        except BaseException as e:  # noqa: BLE001 - reported to every caller, and the server exits
            logger.exception("Loading the engine failed")
            self._post(self._on_failed, e)
            return
        self._post(self._on_ready, engine.get_tokenizer(), engine.config, engine.structured_output,
                   time.perf_counter() - t0)  # fmt: skip
        live: set[str] = set()  # requests the engine holds; engine-thread state
        try:
            while self._apply_commands(engine, live, block=not engine.has_unfinished_requests()):
                if engine.has_unfinished_requests():
                    start = time.monotonic()
                    outputs = engine.step()
                    end = time.monotonic()
                    live.difference_update(o.request_id for o in outputs if o.finished)
                    if self._observer:
                        self._observer.on_step(engine, outputs, start, end)
                        self._observer.on_state(engine)
                    self._post(self._on_outputs, outputs, engine.scheduler.num_waiting)
        except BaseException as e:  # noqa: BLE001 - a failed step fails every request, loudly
            logger.exception("The engine loop failed; failing all requests")
            self._post(self._on_failed, e)

    def _apply_commands(self, engine: LLMEngine, live: set[str], block: bool) -> bool:
        """Apply every queued command (waiting for one when idle). Returns False on stop."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        aborted: list[RequestOutput] = []
        for command in commands:
            if command is _STOP:
                aborted += engine.abort_request(sorted(live))
                self._finish_aborts(engine, aborted)
                return False
            if isinstance(command, _Add):
                self._add(engine, live, command)
            elif command.request_id in live:
                live.discard(command.request_id)
                aborted += engine.abort_request(command.request_id)
        self._finish_aborts(engine, aborted)
        return True

    def _add(self, engine: LLMEngine, live: set[str], command: _Add) -> None:
        error = None
        try:
            engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
            live.add(command.request_id)
            if self._observer:
                self._observer.on_added(command.request_id, command.arrival_time)
        except (ValueError, TypeError) as e:  # the engine's own validation: nothing was queued
            error = e
        self._post(self._on_added, command.future, error, engine.scheduler.num_waiting)

    def _finish_aborts(self, engine: LLMEngine, aborted: list[RequestOutput]) -> None:
        if self._observer:
            if aborted:
                self._observer.on_aborted(aborted)
            self._observer.on_state(engine)
        if aborted:
            self._post(self._on_outputs, aborted, engine.scheduler.num_waiting)
