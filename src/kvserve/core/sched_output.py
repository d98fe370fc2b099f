"""What the scheduler hands the model runner each step: new requests once, then only diffs."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen: everything it needs, sent once."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache (prefix hit) before this step


@dataclass
class CachedRequestData:
    """A request the runner already holds. Its token ids are the runner's own copy (prompt plus
    the tokens it sampled), so only block-table growth and the computed count travel."""

    req_id: str
    new_block_ids: list[int]  # appended to its block table; the whole table when resumed
    num_computed_tokens: int  # before this step
    resumed_from_preemption: bool = False


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # req_id -> tokens this step
    total_num_scheduled_tokens: int = 0
    # Requests that finished (or were aborted) since the previous step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Requests with a grammar that sample this step, in scheduled order; empty when none does.
    grammar_req_ids: list[str] = field(default_factory=list)
    # Their allowed tokens, filled by the engine after scheduling: row i for grammar_req_ids[i]
    # (the structured-output manager's type, opaque here). None when grammar_req_ids is empty.
    grammar_bitmask: object = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RequestUpdate:
    """What one step did to one request, for the engine's output processing."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens that were prefix-cache hits at admission
