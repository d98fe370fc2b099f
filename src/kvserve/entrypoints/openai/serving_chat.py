"""POST /v1/chat/completions: the conversation is rendered with the model's Jinja chat template (or
--chat-template), then generated as one engine request with `n` choices. Streams send, per choice, a
`delta.role` chunk first, then `delta.content` chunks, the finish_reason, and `data: [DONE]` last.

With tools (tool_choice.py) each choice's text goes through the plan's parser: content and
`tool_calls` in the message, or, streamed, content deltas and vLLM's tool-call deltas (a call's first
delta: index, id, type, function.name, arguments ""; then index and argument fragments). An answer that
carries calls and ended by itself finishes with "tool_calls"."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

from fastapi import Request
from fastapi.responses import Response

from kvserve.engine.async_engine import RequestStream
from kvserve.entrypoints.openai.errors import APIError, bad_request, from_value_error, openai_error_json
from kvserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
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
from kvserve.entrypoints.openai.tool_choice import FunctionCall, ToolCall, ToolPlan, plan_tools
from kvserve.entrypoints.openai.tool_parsers.base import StreamDelta, ToolCallStream, ToolParser
from kvserve.outputs import SampleLogprobs


@dataclass
class _Context:
    id: str
    created: int
    model: str
    request: ChatCompletionRequest
    num_prompt_tokens: int
    top_logprobs: Optional[int]  # None: no logprobs
    tools: ToolPlan

    def new_call_id(self) -> str:
        return (self.tools.call_ids or ToolParser).new_call_id()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    tool_stream: Optional[ToolCallStream] = None  # streaming with tools: the calls read so far


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
        tools = self._plan_tools(request)
        overrides: dict = {}
        if tools.constraint is not None:
            overrides["structured_outputs"] = tools.constraint
        if tools.parser is not None and tools.parser.needs_special_tokens:
            overrides["skip_special_tokens"] = False
        params = s.sampling_params(request, overrides, max_tokens=max_tokens, logprobs=k)
        text = s.render_chat(
            request.messages, request.add_generation_prompt, request.continue_final_message,
            request.chat_template_kwargs, tools.template_tools,
        )  # fmt: skip
        ids = s.tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
        ids = s.check_prompt(ids, params, param="messages")
        ctx = _Context(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, request, len(ids), k, tools)
        try:
            streams = await s.add_all(ctx.id, [{"prompt": text, "prompt_token_ids": ids}], params, arrival)
        except APIError as e:
            if tools.constraint is not None and (e.param or "").startswith("structured_outputs"):
                detail = e.message.split(": ", 1)[-1]
                raise bad_request(f"tools: the JSON schema made of the tools' parameters does not compile: {detail}",
                                  param="tools") from None  # fmt: skip
            raise
        if request.stream:
            return EventStream(self._stream(ctx, streams), streams)
        return await until_disconnect(raw_request, self._collect(ctx, streams), streams)

    def _plan_tools(self, request: ChatCompletionRequest) -> ToolPlan:
        config = self.serving.config
        auto_parser = config.tool_call_parser if config.enable_auto_tool_choice else None
        try:
            return plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls,
                              request.constraint_fields(), auto_parser)  # fmt: skip
        except ValueError as e:
            raise from_value_error(e) from None

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
                self._choice(ctx, index, c) for index, c in sorted(choices.items())
            ],
        )  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")  # NaN/inf logprobs -> null

    @staticmethod
    def _choice(ctx: _Context, index: int, c: _Choice) -> ChatChoice:
        message = ChatMessageOut(content="".join(c.text))
        if ctx.tools.parser is not None:
            found = ctx.tools.parser.extract_tool_calls(message.content)
            calls = [ToolCall(id=ctx.new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
                     for call in found.calls[: _max_calls(ctx)]]  # fmt: skip
            message = ChatMessageOut(content=found.content, tool_calls=calls)
        return ChatChoice(
            index=index, message=message, finish_reason=_finish_reason(c.finish_reason, bool(message.tool_calls)),
            logprobs=ChatChoiceLogprobs(content=c.logprobs) if ctx.top_logprobs is not None else None,
        )  # fmt: skip

    async def _stream(self, ctx: _Context, streams: Sequence[RequestStream]) -> AsyncIterator[str]:
        options = ctx.request.stream_options
        choices: dict[int, _Choice] = {}
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options.continuous_usage_stats
        exclude = None if include_usage else {"usage"}

        def running_usage() -> Optional[UsageInfo]:  # vLLM's continuous_usage_stats: the usage so far
            return self._usage(ctx, sum(c.num_tokens for c in choices.values())) if continuous else None

        def chunk(choices: list[ChatStreamChoice], usage: Optional[UsageInfo] = None) -> str:
            body = ChatCompletionStreamResponse(
                id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage
            )
            return sse(body.model_dump_json(exclude=exclude if usage is None else None))

        for index in range(ctx.request.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                        running_usage())  # fmt: skip
        try:
            async for _, out in merge_streams(streams):
                for c in out.outputs:
                    choice = choices.get(c.index)
                    if choice is None:
                        choice = choices[c.index] = _Choice()
                        choice.tool_stream = ctx.tools.parser.stream() if ctx.tools.parser is not None else None
                    if choice.finish_reason is not None or not (c.token_ids or c.text or c.finish_reason):
                        continue  # finished earlier, or nothing new for this choice in this step
                    choice.num_tokens += len(c.token_ids)
                    choice.finish_reason = c.finish_reason
                    logprobs = None
                    if ctx.top_logprobs is not None and c.logprobs is not None:
                        logprobs = ChatChoiceLogprobs(content=self._logprobs(c.token_ids, c.logprobs, ctx.top_logprobs))
                    deltas = self._deltas(ctx, choice, c.text, final=c.finish_reason is not None)
                    finish_reason = c.finish_reason
                    if choice.tool_stream is not None:
                        finish_reason = _finish_reason(finish_reason, bool(choice.tool_stream.view.calls))
                    if not deltas and logprobs is None and finish_reason is None:
                        continue  # the parser holds this step's text back
                    deltas = deltas or [DeltaMessage()]
                    for i, delta in enumerate(deltas):  # logprobs with the first, finish_reason with the last
                        yield chunk([ChatStreamChoice(
                            index=c.index, delta=delta, logprobs=logprobs if i == 0 else None,
                            finish_reason=finish_reason if i == len(deltas) - 1 else None,
                        )], running_usage())  # fmt: skip
            if include_usage:
                yield chunk([], self._usage(ctx, sum(c.num_tokens for c in choices.values())))
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band, as OpenAI does
            error = e if isinstance(e, APIError) else APIError(500, str(e), code="engine_error")
            yield sse(openai_error_json(error))
        yield SSE_DONE

    @staticmethod
    def _deltas(ctx: _Context, choice: _Choice, text: str, final: bool) -> list[DeltaMessage]:
        """This step's deltas of one choice: its text, or with tools the content and call deltas the text
        completes (none while the parser holds the text back)."""
        if choice.tool_stream is None:
            return [DeltaMessage(content=text or None)]
        new: StreamDelta = choice.tool_stream.feed(text, final)
        deltas = [DeltaMessage(content=new.content)] if new.content else []
        limit = _max_calls(ctx)
        for call in new.tool_calls:
            if limit is not None and call.index >= limit:
                continue
            if call.name is not None:  # a call's first delta
                function = DeltaFunctionCall(name=call.name, arguments="")
                tool = DeltaToolCall(index=call.index, id=ctx.new_call_id(), type="function", function=function)
            else:
                tool = DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=call.arguments))
            deltas.append(DeltaMessage(tool_calls=[tool]))
        return deltas

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


def _max_calls(ctx: _Context) -> Optional[int]:
    """parallel_tool_calls false: only the first call the answer makes is given (as vLLM filters them;
    "required" already asks the grammar for one). None: all of them."""
    return 1 if ctx.request.parallel_tool_calls is False else None


def _finish_reason(reason: Optional[str], has_calls: bool) -> Optional[str]:
    """"tool_calls" for an answer with calls that ended by itself; "length" stays (the answer was cut)."""
    return "tool_calls" if has_calls and reason == "stop" else reason
