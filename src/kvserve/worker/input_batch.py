"""The runner's copy of each request it serves, and the per-step batch built from scheduler diffs.

The runner owns token ids from the first time it sees a request (prompt) plus every token it
samples; the scheduler keeps its own list. Both append the same sampled token each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kvserve.core.sched_output import SchedulerOutput
from kvserve.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + sampled
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: Optional[torch.Generator]
    block_ids: list[int]
    num_computed_tokens: int = 0
    num_prompt_logprobs_done: int = 0  # prompt positions whose logprobs were already returned

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class StepBatch:
    """Host-side layout of one step, in scheduled order (request b = req_ids[b])."""

    req_ids: list[str]
    input_ids: list[int]  # [T] packed
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    # Requests that sample this step (their whole sequence is computed): index into req_ids.
    sampling_rows: list[int] = field(default_factory=list)
    # (req index, first prompt position p of this chunk whose next token is a prompt token, count)
    prompt_logprob_spans: list[tuple[int, int, int]] = field(default_factory=list)


class InputBatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.requests: dict[str, CachedRequestState] = {}

    def apply(self, out: SchedulerOutput) -> None:
        """Bring the runner's request states up to date with the scheduler's diffs."""
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.device).manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.prompt_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                sampling_params=params,
                generator=generator,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in out.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            if cached.resumed_from_preemption:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def build(self, out: SchedulerOutput) -> StepBatch:
        req_ids = [n.req_id for n in out.scheduled_new_reqs] + [c.req_id for c in out.scheduled_cached_reqs]
        batch = StepBatch(req_ids, [], [], [], [])
        for b, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            start, n = state.num_computed_tokens, out.num_scheduled_tokens[req_id]
            end = start + n
            batch.input_ids.extend(state.token_ids[start:end])
            batch.query_lens.append(n)
            batch.seq_lens.append(end)
            batch.block_tables.append(state.block_ids)
            if end == len(state.token_ids):
                batch.sampling_rows.append(b)
            if state.sampling_params.prompt_logprobs is not None:
                # Position p predicts token p + 1; prompt targets exist for p < num_prompt - 1.
                first = max(start, state.num_prompt_logprobs_done)
                last = min(end, state.num_prompt_tokens - 1)
                if last > first:
                    batch.prompt_logprob_spans.append((b, first, last - first))
        return batch
