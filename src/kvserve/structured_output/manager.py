"""StructuredOutputManager: grammars compiled once per distinct constraint, off the step loop, and the
step's token bitmask for the requests that sample under a grammar.

Threads: compiling runs on a small pool of its own (xgrammar releases the GIL while it compiles), so
neither the engine's step loop nor the server's event loop waits for it; `submit` may be called from
any thread. Matchers (one per request, `GrammarState`) are created and advanced on the engine thread only.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

from kvserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

COMPILE_WORKERS = 2  # distinct grammars compiled at the same time
MAX_CACHED_GRAMMARS = 256  # compiled grammars kept (least recently submitted dropped first)


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        """Cheap: nothing is imported or built until the first constraint is submitted."""
        self._tokenizer, self._vocab_size, self._stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._lock = threading.Lock()  # guards _grammars and _pool
        self._grammars: OrderedDict[tuple, Future] = OrderedDict()  # params.key() -> CompiledGrammar
        self._pool: Optional[ThreadPoolExecutor] = None
        self._backend_lock = threading.Lock()
        self._backend = None  # XgrammarBackend, built by the first compile (imports xgrammar)

    # --- compiling (any thread) -------------------------------------------------------------------
    def submit(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar of `params`, as a future: compiled once per distinct constraint. Its
        exception is a ValueError carrying the compiler's message."""
        key = params.key()
        with self._lock:
            future = self._grammars.get(key)
            if future is not None:
                self._grammars.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="kvserve-grammar")
            future = self._grammars[key] = self._pool.submit(self._compile, params)
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return future

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Blocking submit(): the compiled grammar, or the ValueError."""
        return self.submit(params).result()

    def _compile(self, params: StructuredOutputsParams) -> Any:
        backend = self.backend()
        start = time.perf_counter()
        compiled = backend.compile(params)
        logger.debug("Compiled a %s grammar in %.1f ms", params.kind, (time.perf_counter() - start) * 1e3)
        return compiled

    def backend(self):
        """The xgrammar backend, built on first use (about 2 s: importing xgrammar and transformers,
        reading the vocabulary)."""
        with self._backend_lock:
            if self._backend is None:
                try:
                    from kvserve.structured_output.xgrammar_backend import XgrammarBackend
                except ImportError as e:
                    raise ValueError(
                        f"Structured output needs xgrammar, which cannot be imported ({e}). `make install` "
                        "installs it, or: pip install '.[structured]' && pip install --no-deps xgrammar==0.2.9"
                    ) from e
                self._backend = XgrammarBackend(self._tokenizer, self._vocab_size, self._stop_token_ids)
            return self._backend

    # --- requests (engine thread) ------------------------------------------------------------------
    def request_grammar(self, params: StructuredOutputsParams) -> "GrammarState":
        """A new request's grammar state (compiling, unless its grammar was compiled before). Raises the
        ValueError right away if this constraint is already known not to compile."""
        future = self.submit(params)
        if future.done() and future.exception() is not None:
            raise future.exception()
        return GrammarState(future, self)

    def grammar_bitmask(self, requests: dict[str, Any], req_ids: list[str]) -> Any:
        """[len(req_ids), ceil(V / 32)] int32: row i holds the tokens requests[req_ids[i]] may sample next."""
        bitmask = self._backend.allocate_bitmask(len(req_ids))
        for row, req_id in enumerate(req_ids):
            requests[req_id].grammar.fill_bitmask(bitmask, row)
        return bitmask


class GrammarState:
    """One request's grammar: the compile future, then its own matcher (core.request.RequestGrammar).

    Invariant: the matcher has accepted exactly the request's output tokens."""

    def __init__(self, future: Future, manager: StructuredOutputManager) -> None:
        self.future = future
        self._manager = manager
        self._matcher = None

    def is_ready(self) -> bool:
        return self.future.done() and self.future.exception() is None

    @property
    def error(self) -> Optional[BaseException]:
        """The compile error once the future is done, else None."""
        return self.future.exception() if self.future.done() else None

    @property
    def matcher(self):
        if self._matcher is None:
            self._matcher = self._manager.backend().new_matcher(self.future.result())
        return self._matcher

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
