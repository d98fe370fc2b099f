"""Turns each step's token updates into RequestOutputs: detokenization, stop strings, logprobs,
and the fan-in of n > 1 child requests into one parent output. Runs beside the engine loop;
owns one RequestState per child request, created at add_request and dropped when finished."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kvserve.core.sched_output import RequestUpdate
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from kvserve.sampling_params import RequestOutputKind, SamplingParams
from kvserve.worker.model_runner import ModelRunnerOutput, TokenLogprobs


@dataclass
class ParentRequest:
    """Groups the n child requests of one user request; outputs are indexed by child index."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[int, "RequestState"] = field(default_factory=dict)
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


@dataclass
class RequestState:
    child_id: str
    index: int
    parent: ParentRequest
    detokenizer: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0  # for DELTA outputs


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}  # child id -> state

    def add_request(self, parent: ParentRequest, child_id: str, index: int, params: SamplingParams) -> None:
        detok = None
        if params.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                parent.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
        state = RequestState(child_id, index, parent, detok)
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        if params.prompt_logprobs is not None and parent.prompt_logprobs is None:
            parent.prompt_logprobs = [None]
        parent.children[index] = state
        self.states[child_id] = state

    def process(
        self, updates: list[RequestUpdate], runner_out: ModelRunnerOutput
    ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the outputs to hand to callers, and (child id, stop string) pairs of requests a
        stop string finished, which the caller must finish in the scheduler."""
        for child_id, (first, entries) in runner_out.prompt_logprobs.items():
            parent = self.states[child_id].parent
            if len(parent.prompt_logprobs) == first + 1:  # children of one parent compute them alike
                parent.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        stopped: list[tuple[str, str]] = []
        touched: dict[str, ParentRequest] = {}
        for update in updates:
            state = self.states.get(update.req_id)
            if state is None:
                continue
            state.parent.num_cached_tokens = update.num_cached_tokens
            state.token_ids.extend(update.new_token_ids)
            if state.logprobs is not None and update.req_id in runner_out.logprobs:
                entry = runner_out.logprobs[update.req_id]
                state.logprobs.append(self._logprob_dict(entry))
                state.cumulative_logprob += entry[1][0]
            state.finish_reason, state.stop_reason = update.finish_reason, update.stop_reason
            if state.detokenizer is not None:
                stop_str = state.detokenizer.update(update.new_token_ids)
                if stop_str is not None and state.finish_reason is None:
                    state.finish_reason, state.stop_reason = "stop", stop_str
                    stopped.append((update.req_id, stop_str))
            touched[state.parent.request_id] = state.parent
        outputs = [o for p in touched.values() if (o := self._make_output(p)) is not None]
        for parent in touched.values():
            for child in parent.children.values():
                if child.finish_reason is not None:
                    self.states.pop(child.child_id, None)
        return outputs, stopped

    def abort(self, child_ids: list[str]) -> list[RequestOutput]:
        touched = {}
        for child_id in child_ids:
            state = self.states.get(child_id)
            if state is not None and state.finish_reason is None:
                state.finish_reason = "abort"
                touched[state.parent.request_id] = state.parent
        outputs = [o for p in touched.values() if (o := self._make_output(p)) is not None]
        for child_id in child_ids:
            if child_id in self.states and self.states[child_id].finish_reason is not None:
                del self.states[child_id]
        return outputs

    def _make_output(self, parent: ParentRequest) -> Optional[RequestOutput]:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        outputs = [self._completion(parent.children[i], delta, finished) for i in sorted(parent.children)]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=parent.num_cached_tokens,
        )

    def _completion(self, state: RequestState, delta: bool, finished: bool) -> CompletionOutput:
        done = state.finish_reason is not None
        text = ""
        if state.detokenizer is not None:
            text = state.detokenizer.get_next_output_text(done or finished, delta)
        start = state.num_tokens_sent if delta else 0
        token_ids = state.token_ids[start:]
        logprobs = state.logprobs[start:] if state.logprobs is not None else None
        state.num_tokens_sent = len(state.token_ids)
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
        )

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        """Column 0 is the chosen token with its rank; then the top-k, ranked 1..k."""
        ids, lps, rank = entry
        out = {ids[0]: Logprob(lps[0], rank, self.tokenizer.decode_token(ids[0]))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, r, self.tokenizer.decode_token(tid))
        return out
