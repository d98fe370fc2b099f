"""POST /v1/chat/completions: the conversation is rendered with the model's Jinja chat template (or
--chat-template), then generated as one engine request with `n` choices. Streams send, per choice, a
`delta.role` chunk first, then `delta.content` chunks, the finish_reason, and `data: [DONE]` last."""
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
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
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
from kvserve.outputs import SampleLogprobs


@dataclass
class _Context:
    id: str
    created: int
    model: str
    request: ChatCompletionRequest
    num_prompt_tokens: int
    top_logprobs: Optional[int]  # None: no logprobs


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        s = self.serving
        model = s.check_model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
        k = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = s.sampling_params(request, max_tokens=max_tokens, logprobs=k)
        text = s.render_chat(
            request.conversation(), request.add_generation_prompt, request.continue_final_message,
            request.chat_template_kwargs,
        )  # fmt: skip
        ids = s.tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
        s.check_prompt(ids, params.max_tokens, param="messages")
        ctx = _Context(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, request, len(ids), k)
        streams = await s.add_all(ctx.id, [{"prompt": text, "prompt_token_ids": ids}], params, arrival)
        if request.stream:
            return EventStream(self._stream(ctx, streams), streams)
        return await until_disconnect(raw_request, self._collect(ctx, streams), streams)

    async def _collect(self, ctx: _Context, streams: Sequence[RequestStream]) -> Response:
        choices: dict[int, _Choice] = {}
        async for _, out in merge_streams(streams):
            for c in out.outputs:
                choice = choices.setdefault(c.index, _Choice())
                choice.text.append(c.text)
                choice.num_tokens += len(c.token_ids)
                if ctx.top_logprobs is not None and c.logprobs is not None:
                    choice.logprobs += self._logprobs(c.token_ids, c.logprobs, ctx.top_logprobs)
                choice.finish_reason = c.finish_reason
        body = ChatCompletionResponse(
            id=ctx.id, created=ctx.created, model=ctx.model,
            usage=self._usage(ctx, sum(c.num_tokens for c in choices.values())),
            choices=[
                ChatChoice(
                    index=index, message=ChatMessageOut(content="".join(c.text)), finish_reason=c.finish_reason,
                    logprobs=ChatChoiceLogprobs(content=c.logprobs) if ctx.top_logprobs is not None else None,
                )
                for index, c in sorted(choices.items())
            ],
        )  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")  # NaN/inf logprobs -> null

    async def _stream(self, ctx: _Context, streams: Sequence[RequestStream]) -> AsyncIterator[str]:
        options = ctx.request.stream_options
        include_usage = bool(options and options.include_usage)
        exclude = None if include_usage else {"usage"}

        def chunk(choices: list[ChatStreamChoice], usage: Optional[UsageInfo] = None) -> str:
            body = ChatCompletionStreamResponse(
                id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage
            )
            return sse(body.model_dump_json(exclude=exclude if usage is None else None))

        for index in range(ctx.request.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        choices: dict[int, _Choice] = {}
        try:
            async for _, out in merge_streams(streams):
                for c in out.outputs:
                    choice = choices.setdefault(c.index, _Choice())
                    if choice.finish_reason is not None or not (c.token_ids or c.text or c.finish_reason):
                        continue  # finished earlier, or nothing new for this choice in this step
                    choice.num_tokens += len(c.token_ids)
                    choice.finish_reason = c.finish_reason
                    logprobs = None
                    if ctx.top_logprobs is not None and c.logprobs is not None:
                        logprobs = ChatChoiceLogprobs(content=self._logprobs(c.token_ids, c.logprobs, ctx.top_logprobs))
                    delta = DeltaMessage(content=c.text or None)
                    yield chunk([ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs,
                                                  finish_reason=c.finish_reason)])  # fmt: skip
            if include_usage:
                yield chunk([], self._usage(ctx, sum(c.num_tokens for c in choices.values())))
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band, as OpenAI does
            error = e if isinstance(e, APIError) else APIError(500, str(e), code="engine_error")
            yield sse(openai_error_json(error))
        yield SSE_DONE

    @staticmethod
    def _logprobs(token_ids: list[int], entries: SampleLogprobs, k: int) -> list[ChatTokenLogprob]:
        """Per token: its text, logprob and UTF-8 bytes, and the k most likely tokens by rank."""
        result = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry[token_id]
            top = sorted((e for e in entry.values() if e.rank is not None and e.rank <= k), key=lambda e: e.rank)
            token = chosen.decoded_token or ""
            result.append(
                ChatTokenLogprob(
                    token=token, logprob=chosen.logprob, bytes=list(token.encode()),
                    top_logprobs=[
                        TopLogprob(token=e.decoded_token or "", logprob=e.logprob,
                                   bytes=list((e.decoded_token or "").encode()))
                        for e in top[:k]
                    ],
                )
            )  # fmt: skip
        return result

    @staticmethod
    def _usage(ctx: _Context, completion_tokens: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=ctx.num_prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=ctx.num_prompt_tokens + completion_tokens,
        )  # fmt: skip
