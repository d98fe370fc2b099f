"""LLMEngine: add_request / step / abort_request. One step = schedule, run, update, process outputs.

The server's async loop and the offline LLM both drive this synchronously; it is not thread-safe.
"""
from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Optional, Union

from kvserve.config import EngineConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.scheduler import Scheduler
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.output_processor import OutputProcessor, ParentRequest
from kvserve.engine.tokenizer import load_tokenizer
from kvserve.inputs import PromptType
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.structured_output import GrammarState, StructuredOutputManager
from kvserve.worker.model_runner import ModelRunner, kv_cache_bytes_per_block

logger = logging.getLogger(__name__)



class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer_path: Optional[str] = None) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_path or config.model.path)
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        if num_blocks < 1:
            raise ValueError("The KV cache budget holds no block: give it more memory (kv_cache_memory_bytes).")
        self.runner.allocate_kv_cache(num_blocks)
        block_size = config.cache.block_size
        self.scheduler = Scheduler(
            config.scheduler, KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(config.model.eos_token_ids)
        self.structured_output = StructuredOutputManager(
            self.tokenizer, config.model.vocab_size, sorted(self.eos_token_ids)
        )
        # Child requests whose grammar was still compiling when they were added (the scheduler holds
        # them back until it is ready); a failed compile aborts them.
        self._compiling: dict[str, GrammarState] = {}
        self._parents: dict[str, ParentRequest] = {}
        self._children: dict[str, list[str]] = {}  # parent id -> child ids

        max_len = config.scheduler.max_model_len
        gib = num_blocks * kv_cache_bytes_per_block(config) / 2**30
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s); maximum concurrency at "
            "max_model_len=%d: %.2fx. Engine ready in %.1fs.",
            num_blocks, block_size, num_blocks * block_size, gib, config.cache.cache_dtype,
            max_len, num_blocks * block_size / max_len, time.perf_counter() - t0,
        )  # fmt: skip

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config(), args.tokenizer)

    def get_tokenizer(self):
        return self.tokenizer

    # --- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
    ) -> None:
        """Queue a request. Raises ValueError (nothing queued) if it is invalid or can never fit."""
        params = (params or SamplingParams()).clone()
        text, token_ids = self._tokenize(prompt)
        max_len = self.config.scheduler.max_model_len
        token_ids = params.truncated_prompt(token_ids, max_len)
        self._validate(token_ids, params)
        params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words or [])
        max_tokens = params.max_tokens if params.max_tokens is not None else max(max_len - len(token_ids), 1)
        params.all_stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")

        parent = ParentRequest(request_id, text, token_ids, params)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                if params.seed is not None:
                    child_params.seed = params.seed + index
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            children.append((child_id, index, child_params))
        # Each child has its own grammar state (one compiled grammar); a known compile error raises here.
        grammars = [self._new_grammar(p) for _, _, p in children]
        # Children share length limits: if the first is accepted, all are (a rejection queues nothing).
        for (child_id, _, child_params), grammar in zip(children, grammars):
            self.scheduler.add_request(Request(child_id, token_ids, child_params, max_tokens, arrival_time, grammar))
            if grammar is not None and not grammar.is_ready():
                self._compiling[child_id] = grammar
        for child_id, index, child_params in children:
            self.output_processor.add_request(parent, child_id, index, child_params)
        self._parents[request_id] = parent
        self._children[request_id] = [cid for cid, _, _ in children]

    def abort_request(self, request_ids: Union[str, list[str]]) -> list[RequestOutput]:
        """Abort requests (parent ids); frees their KV blocks now. Unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = [c for rid in ids for c in self._children.get(rid, [])]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        outputs = self.output_processor.abort(child_ids)
        for rid in ids:
            self._forget(rid)
        for child_id in child_ids:
            self._compiling.pop(child_id, None)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed = self._abort_failed_grammars() if self._compiling else []
        sched_out = self.scheduler.schedule()
        if sched_out.grammar_req_ids:
            sched_out.grammar_bitmask = self.structured_output.grammar_bitmask(
                self.scheduler.requests, sched_out.grammar_req_ids
            )
        runner_out = self.runner.execute_model(sched_out)
        if sched_out.is_empty:
            if self._compiling and not failed:  # nothing to run until a grammar is ready: wait for one
                futures.wait([g.future for g in self._compiling.values()], 0.05, futures.FIRST_COMPLETED)
            return failed
        updates = self.scheduler.update_from_output(sched_out, runner_out.sampled)
        outputs, stopped = self.output_processor.process(updates, runner_out)
        outputs = failed + outputs
        for child_id, stop_str in stopped:
            self.scheduler.finish_requests([child_id], RequestStatus.FINISHED_STOPPED, stop_str)
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
        return outputs

    # --- internals ----------------------------------------------------------------------------
    def _new_grammar(self, params: SamplingParams) -> Optional[GrammarState]:
        if params.structured_outputs is None:
            return None
        return self.structured_output.request_grammar(params.structured_outputs)

    def _abort_failed_grammars(self) -> list[RequestOutput]:
        """Forget compiled grammars' requests from _compiling; abort those whose grammar failed."""
        done = [cid for cid, grammar in self._compiling.items() if grammar.future.done()]
        failed = []
        for child_id in done:
            error = self._compiling.pop(child_id).error
            if error is not None:
                logger.error("Request %s aborted: %s", child_id, error)
                failed.append(child_id)
        if not failed:
            return []
        self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ABORTED)
        outputs = self.output_processor.abort(failed)
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
        return outputs

    def _forget(self, request_id: str) -> None:
        self._parents.pop(request_id, None)
        self._children.pop(request_id, None)

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's tokens as it starts the text and, where that differs in its first token
        only, after a space, in mid-text (vLLM's rule, SamplingParams.update_from_tokenizer)."""
        sequences: list[list[int]] = []
        for word in words:
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            sequences.append(alone)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced[0] != alone[0] and len(spaced) == len(alone):
                sequences.append(spaced)
        return sequences

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.config.model.vocab_size
        if not token_ids:
            raise ValueError("The prompt is empty; give at least one token.")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Prompt token ids must be in [0, {vocab}); got {bad[:5]}.")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {})),
                          ("allowed_token_ids", params.allowed_token_ids or [])):  # fmt: skip
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} token ids must be in [0, {vocab}); got {bad[:5]}.")
        for name, k in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and k > 20:
                raise ValueError(f"{name} can be at most 20, got {k}.")
