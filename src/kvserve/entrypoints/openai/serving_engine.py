"""What every generating route shares: the model-name check, SamplingParams from a request, prompt
checks, handing requests to the AsyncLLM, and the two ways a response waits on them (a server-sent
event stream, or one JSON body) -- both of which abort the requests when the client goes away.

Invariant: every request added through `add_all` is aborted unless it finished, whatever happens to
the HTTP exchange (disconnect, error, cancellation): `abort_unfinished` runs in a `finally` on each path.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Optional, Sequence, Union

import anyio
import jinja2
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvserve.engine.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestStream,
)
from kvserve.entrypoints.openai.errors import APIError, bad_request, from_value_error, model_not_found
from kvserve.entrypoints.openai.errors import service_unavailable
from kvserve.entrypoints.openai.protocol import ChatMessage, SamplingRequest
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import RequestOutputKind, SamplingParams
from kvserve.server_config import ServerConfig

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # the engine's limit


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_names = config.model_names
        self.chat_template = config.resolved_chat_template()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len

    def check_model(self, name: Optional[str]) -> str:
        """The name responses report; 404 for a model this server does not serve."""
        if name is not None and name not in self.model_names:
            raise model_not_found(name, self.model_names)
        return name or self.model_names[0]

    def sampling_params(
        self, request: Union[SamplingRequest, dict[str, Any]], overrides: Optional[dict[str, Any]] = None, **extra: Any
    ) -> SamplingParams:
        """SamplingParams from a request's fields (or kwargs), `overrides` replacing some of them, and `extra`,
        with DELTA outputs (each output carries only new tokens); 400 if invalid."""
        for name in ("logprobs", "prompt_logprobs"):
            k = extra.get(name)
            if k is not None and k > MAX_LOGPROBS:
                raise bad_request(f"{name} can be at most {MAX_LOGPROBS}, got {k}.", param=name)
        try:
            kwargs = request.sampling_kwargs() if isinstance(request, SamplingRequest) else request
            return SamplingParams(**{**kwargs, **(overrides or {})}, **extra, output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError) as e:
            raise from_value_error(e) from None

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Optional[dict[str, Any]] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> str:
        """The conversation as prompt text, by the chat template (which also sees `tools`); 400 if the
        template rejects it."""
        try:
            conversation = chat_conversation(messages)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            raise bad_request(f"Cannot render the messages with the chat template: {e}", param="messages") from None

    def check_prompt(self, token_ids: Sequence[int], params: SamplingParams, param: str = "prompt") -> list[int]:
        """The engine's own admission rules, checked here so that a bad request never reaches it.
        -> the prompt as the engine takes it (truncate_prompt_tokens applied)."""
        token_ids, max_tokens = params.truncated_prompt(list(token_ids), self.max_model_len), params.max_tokens
        if not token_ids:
            raise bad_request("The prompt is empty; give at least one token.", param=param)
        vocab = self.engine.config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"Prompt token ids must be in [0, {vocab}); got {bad[:5]}.", param=param)
        bad = [t for t in params.allowed_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"allowed_token_ids must be in [0, {vocab}); got {bad[:5]}.", param="allowed_token_ids")
        limit, n = self.max_model_len, len(token_ids)
        if max_tokens is None and n >= limit:
            raise bad_request(
                f"The prompt has {n} tokens, but the context holds {limit} (max_model_len), prompt and output "
                "together. Shorten the prompt.", param=param, code="context_length_exceeded",
            )  # fmt: skip
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(
                f"This request needs {n} prompt tokens + {max_tokens} max_tokens = {n + max_tokens} tokens, "
                f"more than the context holds ({limit}, max_model_len). Shorten the prompt or lower max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return token_ids

    async def add_all(
        self, request_id: str, prompts: list[dict], params: SamplingParams, arrival_time: float
    ) -> list[RequestStream]:
        """Add one engine request per prompt (ids `request_id-i`); all or none are queued."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(rid, prompt, params, arrival_time))
        except BaseException as e:
            abort_unfinished(streams)
            if isinstance(e, Exception):
                raise _as_api_error(e) from e
            raise
        return streams


def chat_conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates read them: content as text ("" when null), a call's arguments as
    the object they encode (as vLLM and transformers pass them). ValueError naming the message whose
    arguments are not JSON."""
    conversation = []
    for i, message in enumerate(messages):
        rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            rendered["name"] = message.name
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            rendered["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise ValueError(f"messages.{i}.tool_calls.{j}.function.arguments must be JSON text, as the "
                                     f"answer gave it; got {call.function.arguments!r}.") from None  # fmt: skip
                function = {"name": call.function.name, "arguments": arguments}
                rendered["tool_calls"].append({"id": call.id, "type": call.type, "function": function})
        conversation.append(rendered)
    return conversation


def _as_api_error(error: Exception) -> Exception:
    if isinstance(error, QueueFullError):
        return service_unavailable(f"The server is busy: {error}. Retry later.", code="queue_full")
    if isinstance(error, EngineNotReadyError):
        return service_unavailable("The model is still loading. Retry shortly.", code="engine_loading", retry_after=5)
    if isinstance(error, EngineDeadError):
        return APIError(500, str(error), code="engine_dead")
    if isinstance(error, (ValueError, TypeError)):
        return from_value_error(error)
    return error


def abort_unfinished(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as outputs arrive. Leaves aborting to the caller."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                merged.put_nowait((i, out))
            merged.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            merged.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


# --- waiting on requests: one JSON body, or a server-sent event stream ------------------------------


async def until_disconnect(raw_request: Request, work: Awaitable[Response], streams: Sequence[RequestStream]):
    """Await `work` (which consumes `streams`), but give up as soon as the client disconnects.
    The streams are aborted unless they finished."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return Response(status_code=499)  # nobody reads it: the client is gone
    finally:
        listener.cancel()
        abort_unfinished(streams)


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """A text/event-stream response that notices a client disconnect even while waiting for the first
    token (whatever ASGI spec version the server speaks), and aborts its unfinished requests."""

    def __init__(self, content: AsyncIterator[str], streams: Sequence[RequestStream]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            abort_unfinished(self.streams)


def sse(data: str) -> str:
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
