"""One request's scheduling state. Owned by the scheduler; the KV-cache manager appends block hashes."""
from __future__ import annotations

import enum
import time
from typing import Optional, Protocol

from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after PREEMPTED is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> Optional[str]:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


class RequestGrammar(Protocol):
    """A request's structured-output state, as the scheduler sees it (the engine supplies it). It lives
    with the request's output tokens, not with its KV: it has accepted exactly output_token_ids, so a
    preempted request recomputes its KV and keeps its grammar as it was."""

    def is_ready(self) -> bool:
        """Whether its grammar is compiled (or failed to); until then the request is not scheduled."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete (it accepted a stop token): the request is done."""
        ...


class Request:
    """Invariant: all_token_ids == prompt_token_ids + output_token_ids, and
    0 <= num_computed_tokens <= num_tokens; the first num_computed_tokens tokens have KV in the cache
    (or are being written by the step in flight)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        arrival_time: Optional[float] = None,
        grammar: Optional[RequestGrammar] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # resolved: never None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that finished it
        # Chained hashes of the full blocks of all_token_ids, appended by the KV-cache manager.
        self.block_hashes: list[int] = []
        self.grammar = grammar  # None: unconstrained

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
