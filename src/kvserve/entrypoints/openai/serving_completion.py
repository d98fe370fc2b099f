"""POST /v1/completions: one engine request per prompt, `n` choices each (choice index = prompt * n + i),
answered as one JSON body or as a stream of server-sent events ending in `data: [DONE]`."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

from fastapi import Request
from fastapi.responses import Response

from kvserve.engine.async_engine import RequestStream
from kvserve.entrypoints.openai.errors import APIError, bad_request, openai_error_json
from kvserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)
from kvserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    EventStream,
    OpenAIServing,
    merge_streams,
    sse,
    until_disconnect,
)
from kvserve.outputs import CompletionOutput, PromptLogprobs, SampleLogprobs


@dataclass
class _Context:
    """One HTTP request: what every chunk repeats, and the prompts as (text or None, token ids)."""

    id: str
    created: int
    model: str
    request: CompletionRequest
    prompts: list[tuple[Optional[str], list[int]]]


@dataclass
class _Choice:
    """One choice being assembled from DELTA outputs (or being streamed: then only counters)."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    next_offset: int = 0  # text_offset of the next token
    started: bool = False  # has folded in its first output (which carries the echoed prompt)


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        s = self.serving
        model = s.check_model(request.model)
        if request.suffix is not None:
            raise bad_request("suffix is not supported; omit it.", param="suffix")
        k = request.logprobs
        prompt_logprobs = k if request.echo and k is not None else None
        params = s.sampling_params(
            request, max_tokens=request.max_tokens, logprobs=k, prompt_logprobs=prompt_logprobs
        )
        prompts = self._prompts(request.prompt)
        prompts = [(text, s.check_prompt(ids, params)) for text, ids in prompts]
        ctx = _Context(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, request, prompts)
        engine_prompts = [{"prompt": text, "prompt_token_ids": ids} for text, ids in prompts]
        streams = await s.add_all(ctx.id, engine_prompts, params, arrival)
        if request.stream:
            return EventStream(self._stream(ctx, streams), streams)
        return await until_disconnect(raw_request, self._collect(ctx, streams), streams)

    def _prompts(self, prompt) -> list[tuple[Optional[str], list[int]]]:
        """Normalise the four prompt forms (str, [str], [int], [[int]]) to (text or None, ids) pairs."""
        tokenizer = self.serving.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty; give a string, a list of strings or token ids.", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            return [(text, tokenizer.encode(text)) for text in prompt]
        return [(None, list(ids)) for ids in prompt]

    async def _collect(self, ctx: _Context, streams: Sequence[RequestStream]) -> Response:
        n = ctx.request.n
        choices: dict[int, _Choice] = {}
        async for i, out in merge_streams(streams):
            for c in out.outputs:
                choice = choices.setdefault(i * n + c.index, _Choice())
                self._advance(ctx, i, choice, c, out.prompt_logprobs)
        usage = self._usage(ctx, sum(c.num_tokens for c in choices.values()))
        body = CompletionResponse(
            id=ctx.id, created=ctx.created, model=ctx.model, usage=usage,
            choices=[
                CompletionChoice(index=index, text="".join(c.text), logprobs=c.logprobs, finish_reason=c.finish_reason)
                for index, c in sorted(choices.items())
            ],
        )  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")  # NaN/inf logprobs -> null

    async def _stream(self, ctx: _Context, streams: Sequence[RequestStream]) -> AsyncIterator[str]:
        n, options = ctx.request.n, ctx.request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options.continuous_usage_stats
        exclude = None if include_usage else {"usage"}
        choices: dict[int, _Choice] = {}
        try:
            async for i, out in merge_streams(streams):
                for c in out.outputs:
                    index = i * n + c.index
                    choice = choices.setdefault(index, _Choice())
                    if choice.finish_reason is not None or not (c.token_ids or c.text or c.finish_reason):
                        continue  # finished earlier, or nothing new for this choice in this step
                    choice.text.clear()
                    choice.logprobs = None
                    self._advance(ctx, i, choice, c, out.prompt_logprobs)
                    delta = CompletionChoice(
                        index=index, text="".join(choice.text), logprobs=choice.logprobs,
                        finish_reason=choice.finish_reason,
                    )  # fmt: skip
                    chunk = CompletionStreamResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=[delta])
                    if continuous:
                        chunk.usage = self._usage(ctx, sum(c.num_tokens for c in choices.values()))
                    yield sse(chunk.model_dump_json(exclude=exclude))
            if include_usage:
                usage = self._usage(ctx, sum(c.num_tokens for c in choices.values()))
                last = CompletionStreamResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=[])
                last.usage = usage
                yield sse(last.model_dump_json())
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band, as OpenAI does
            error = e if isinstance(e, APIError) else APIError(500, str(e), code="engine_error")
            yield sse(openai_error_json(error))
        yield SSE_DONE

    def _advance(
        self, ctx: _Context, i: int, choice: _Choice, c: CompletionOutput, prompt_lps: Optional[PromptLogprobs]
    ) -> None:
        """Fold one DELTA output into `choice`; the choice's first output also carries the echoed prompt."""
        k = ctx.request.logprobs
        if not choice.started and ctx.request.echo:
            text, ids = ctx.prompts[i]
            choice.text.append(text if text is not None else self.serving.tokenizer.decode(ids))
            if k is not None and prompt_lps is not None:
                self._add_logprobs(choice, ids, prompt_lps, k)
        choice.started = True
        choice.text.append(c.text)
        choice.num_tokens += len(c.token_ids)
        if k is not None and c.logprobs is not None:
            self._add_logprobs(choice, c.token_ids, c.logprobs, k)
        choice.finish_reason = c.finish_reason

    def _add_logprobs(self, choice: _Choice, token_ids: list[int], entries: SampleLogprobs, k: int) -> None:
        """OpenAI's legacy logprobs: per token its text, logprob, top-k alternatives and text offset."""
        lp = choice.logprobs = choice.logprobs or CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            if entry is None:  # the first prompt token: nothing predicts it
                token, logprob, top = self.serving.tokenizer.decode_token(token_id), None, None
            else:
                token, logprob = entry[token_id].decoded_token or "", entry[token_id].logprob
                top = {e.decoded_token: e.logprob for t, e in entry.items() if t == token_id or (e.rank or 0) <= k}
            lp.tokens.append(token)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(choice.next_offset)
            choice.next_offset += len(token)

    @staticmethod
    def _usage(ctx: _Context, completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(ids) for _, ids in ctx.prompts)
        return UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )  # fmt: skip
