"""The scheduler: one token budget per step, running requests first, then waiting ones.

Each request has num_computed_tokens; a step gives it min(num_tokens - num_computed_tokens, budget)
tokens. Prefill, chunked prefill, prefix-cache hits and decode are all that one rule; while requests
decode, prompts get a shorter step's share (_prefill_budget). When the cache cannot grow a running
request, the most recently admitted running request is preempted (blocks freed, recomputed later
from the front of the waiting queue). A request with a grammar (structured output) is held back while
its grammar compiles, and each token it samples is fed to its grammar (a complete grammar finishes it).
Never touches a tensor.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Iterable

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager, cdiv
from kvserve.core.request import Request, RequestStatus
from kvserve.core.sched_output import CachedRequestData, NewRequestData, RequestUpdate, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the tail is preempted first
        self._finished_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0

    # --- intake -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError if it could never run, even alone."""
        total = request.num_prompt_tokens + request.max_tokens
        if request.num_prompt_tokens == 0:
            raise ValueError("The prompt is empty; give at least one token.")
        if total > self.config.max_model_len:
            raise ValueError(
                f"This request needs {request.num_prompt_tokens} prompt tokens + {request.max_tokens} "
                f"max_tokens = {total} tokens, more than max_model_len={self.config.max_model_len}. "
                "Shorten the prompt, lower max_tokens, or raise max_model_len."
            )
        if cdiv(total, self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(
                f"This request needs {total} tokens of KV cache but the whole cache holds "
                f"{self.kv.num_blocks * self.kv.block_size}. Lower max_tokens or give the KV cache more memory."
            )
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(
        self, request_ids: Iterable[str], status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """Finish requests from outside the step (abort, stop string). Unknown ids are ignored."""
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.stop_reason = stop_reason
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens
        prefill_budget = self._prefill_budget()  # prompt tokens; decode tokens draw on `budget` only
        scheduled: list[Request] = []

        # 1. Running requests, in admission order.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            prefilling = not _is_decoding(request)
            if prefilling:
                num_new = min(num_new, prefill_budget)
            if num_new == 0:  # its last step's token is not back yet, or no prompt tokens are left
                i += 1
                continue
            new_block_ids = self.kv.allocate_slots(request, num_new)
            while new_block_ids is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
                new_block_ids = self.kv.allocate_slots(request, num_new)
            if new_block_ids is None:
                break
            out.scheduled_cached_reqs.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens)
            )
            self._schedule(request, num_new, out, scheduled)
            budget -= num_new
            if prefilling:
                prefill_budget -= num_new
            i += 1

        # 2. Waiting requests, while budget, sequence slots and blocks last. Skipped after a
        # preemption this step: the cache is full, admitting would only thrash. A request whose
        # grammar is still compiling stays in the queue, in its place; the ones behind it go on.
        not_ready: list[Request] = []
        while (
            self.waiting and min(budget, prefill_budget) > 0
            and len(self.running) < self.config.max_num_seqs and not out.preempted_req_ids
        ):  # fmt: skip
            request = self.waiting[0]
            if request.grammar is not None and not request.grammar.is_ready():
                not_ready.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = [], 0
            if request.sampling_params.prompt_logprobs is None:  # prompt logprobs need every position
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget, prefill_budget)
            new_block_ids = self.kv.allocate_slots(request, num_new, hits)
            if new_block_ids is None:
                break
            self.waiting.popleft()
            resumed = request.status == RequestStatus.PREEMPTED
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            if resumed:
                out.scheduled_cached_reqs.append(
                    CachedRequestData(
                        request.request_id,
                        self.kv.get_block_ids(request.request_id),
                        num_hit_tokens,
                        resumed_from_preemption=True,
                    )
                )
            else:
                out.scheduled_new_reqs.append(
                    NewRequestData(
                        request.request_id,
                        request.prompt_token_ids,
                        request.sampling_params,
                        new_block_ids,
                        num_hit_tokens,
                    )
                )
            self._schedule(request, num_new, out, scheduled)
            budget -= num_new
            prefill_budget -= num_new

        self.waiting.extendleft(reversed(not_ready))

        # Advance now, so the next schedule() may run before this step's results are in.
        for request in scheduled:
            request.num_computed_tokens += out.num_scheduled_tokens[request.request_id]
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[RequestUpdate]:
        """Append each request's sampled tokens and finish those that hit a stop condition.

        sampled holds an entry only for requests whose whole sequence was computed this step
        (a partial prefill chunk samples nothing)."""
        updates = []
        for req_id, token_ids in sampled.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue  # finished (e.g. aborted) while the step ran
            new_tokens = []
            for token_id in token_ids:
                request.append_output_token_ids([token_id])
                new_tokens.append(token_id)
                if self._check_stop(request) or (request.grammar is not None and self._advance_grammar(request)):
                    self.running.remove(request)
                    self._finish(request, request.status)
                    break
            updates.append(
                RequestUpdate(
                    req_id, new_tokens, request.status.finish_reason, request.stop_reason,
                    max(request.num_cached_tokens, 0),
                )  # fmt: skip
            )
        return updates

    # --- internals ----------------------------------------------------------------------------
    def _prefill_budget(self) -> int:
        """Prompt tokens this step may take: the whole budget, or a short step's share.

        A step's length is every decoding request's inter-token gap, and a request that arrives
        during a step waits for its end before it can start. So while requests decode, a step holds
        max_num_batched_tokens_while_decoding tokens in all (prompts always get at least half of it).
        The prompts' work is the same, only cut finer: at equal throughput a closed loop of clients
        sees a shorter time to first token and a slightly longer time per output token."""
        budget = self.config.max_num_batched_tokens
        short = self.config.max_num_batched_tokens_while_decoding
        if short is None or short >= budget:
            return budget
        num_decoding = sum(1 for request in self.running if _is_decoding(request))
        if num_decoding == 0:
            return budget
        return max(short - num_decoding, short // 2, 1)

    def _schedule(self, request: Request, num_new: int, out: SchedulerOutput, scheduled: list[Request]) -> None:
        out.num_scheduled_tokens[request.request_id] = num_new
        out.total_num_scheduled_tokens += num_new
        scheduled.append(request)
        if request.grammar is not None and request.num_computed_tokens + num_new == request.num_tokens:
            out.grammar_req_ids.append(request.request_id)  # it samples this step, under its grammar

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_req_ids.add(request.request_id)

    def _check_stop(self, request: Request) -> bool:
        """Sets the finished status and returns True if the last appended token ends the request."""
        params = request.sampling_params
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        if request.num_output_tokens < params.min_tokens:
            return False
        last = request.output_token_ids[-1]
        if last in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                request.stop_reason = last
            return True
        return False

    def _advance_grammar(self, request: Request) -> bool:
        """Feed the last token to the request's grammar; sets the finished status and returns True
        when the grammar is complete ("stop") or rejects the token (which the mask should prevent)."""
        if not request.grammar.accept(request.output_token_ids[-1]):
            logger.warning("Request %s: its grammar rejected token %d; aborting it.",
                           request.request_id, request.output_token_ids[-1])  # fmt: skip
            request.status = RequestStatus.FINISHED_ABORTED
            return True
        if request.grammar.is_terminated():
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        return False

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    # --- stats --------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _is_decoding(request: Request) -> bool:
    """Past its prompt (and any recomputation after preemption): one token per step."""
    return request.num_computed_tokens > 0 and request.num_tokens - request.num_computed_tokens <= 1
