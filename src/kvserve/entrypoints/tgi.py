"""Hugging Face text-generation-inference's native routes: POST /generate, POST /generate_stream (TGI's
server-sent token events), POST / (either, by `stream`, as TGI's router serves it and Hugging Face's
`text_generation` client calls it), GET /info. TGI's parameter names and defaults (greedy unless do_sample
or a sampling knob is set; details on), `grammar` (a JSON schema or a regex), TGI's finish reasons, and
TGI's error shape (422 {"error", "error_type"}).
The engine side is the OpenAI routes' (OpenAIServing), so both APIs share validation and abort rules."""
from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

import kvserve
from kvserve.engine.async_engine import RequestStream
from kvserve.entrypoints.openai.errors import bad_request
from kvserve.entrypoints.openai.serving_engine import EventStream, OpenAIServing, until_disconnect
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import StructuredOutputsParams

TGI_PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})


class Grammar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "json_object", "regex"] = Field(..., description="json (json_object): a JSON schema.")
    value: Union[dict, str] = Field(..., description="The JSON schema (an object or JSON text), or the regex.")

    def params(self) -> StructuredOutputsParams:
        if self.type == "regex":
            if not isinstance(self.value, str) or not self.value:
                raise ValueError("grammar: a regex grammar's value is a non-empty string.")
            return StructuredOutputsParams(regex=self.value)
        if not self.value:
            raise ValueError("grammar: a json grammar's value is a JSON schema.")
        return StructuredOutputsParams(json=self.value)


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Optional[int] = Field(100, description="Tokens to generate at most.")
    do_sample: bool = Field(False, description="Sample; otherwise greedy (unless temperature/top_k/top_p is set).")
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")
    return_full_text: Optional[bool] = Field(False, description="Prepend the input to generated_text.")
    details: bool = Field(True, description="Return per-token details.")
    decoder_input_details: bool = Field(False, description="Also return the prompt tokens' logprobs (prefill).")
    top_n_tokens: Optional[int] = Field(None, description="Also return the n most likely tokens at each step.")
    truncate: Optional[int] = Field(None, description="Keep only the last `truncate` input tokens.")
    # TGI fields accepted for compatibility; only their neutral values are.
    best_of: Optional[int] = Field(None, description="Only 1 (or null).")
    typical_p: Optional[float] = Field(None, description="Not supported: null or 1.")
    watermark: bool = Field(False, description="Not supported: false.")
    adapter_id: Optional[str] = Field(None, description="Not supported: null.")
    grammar: Optional[Grammar] = Field(None, description="Constrain the output to a JSON schema or a regex.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None


class Details(BaseModel):
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: Optional[list[list[Token]]] = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: Optional[int] = None
    input_length: int


class StreamResponse(BaseModel):
    """One `data:` event of /generate_stream: one token; the last also has generated_text and details."""

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


router = APIRouter(tags=["TGI"])


@router.post("/generate", response_model=GenerateResponse, summary="Generate text (TGI)")
async def generate(body: GenerateRequest, raw_request: Request) -> Response:
    serving: TGIServing = raw_request.app.state.tgi
    if body.stream:
        return await serving.generate_stream(body, raw_request)
    return await serving.generate(body, raw_request)


@router.post(
    "/",
    summary="Generate text, streamed or not by `stream` (TGI's root route)",
    responses={200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "A list holding one /generate response, or /generate_stream's events"}},
)  # fmt: skip
async def compat_generate(body: GenerateRequest, raw_request: Request) -> Response:
    serving: TGIServing = raw_request.app.state.tgi
    if body.parameters.return_full_text is None or "return_full_text" not in body.parameters.model_fields_set:
        body.parameters.return_full_text = True  # TGI's default here for a text-generation model
    if body.stream:
        return await serving.generate_stream(body, raw_request)
    return await serving.generate(body, raw_request, as_list=True)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent token events (TGI)",
    responses={200: {"content": {"text/event-stream": {}}, "description": "`data:` StreamResponse events"}},
)
async def generate_stream(body: GenerateRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.tgi.generate_stream(body, raw_request)


@router.get("/info", summary="Model and server limits (TGI)")
async def info(raw_request: Request) -> dict:
    return raw_request.app.state.tgi.info()


class TGIServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def generate(self, body: GenerateRequest, raw_request: Request, as_list: bool = False) -> Response:
        """/generate's JSON response; as_list: inside a one-element list, as TGI answers at /."""
        ids, stream = await self._start(body)
        p = body.parameters

        async def collect() -> Response:
            tokens: list[Token] = []
            top_tokens: list[list[Token]] = []
            text, prefill, last = [], [], None
            async for out in stream:
                c = out.outputs[0]
                text.append(c.text)
                tokens += self._tokens(c)
                top_tokens += self._top_tokens(c, p.top_n_tokens)
                if p.decoder_input_details and not prefill and out.prompt_logprobs is not None:
                    prefill = self._prefill(ids, out)
                last = c
            generated = (body.inputs if p.return_full_text else "") + "".join(text)
            details = None
            if p.details:
                details = Details(
                    finish_reason=_finish_reason(last), generated_tokens=len(tokens), seed=p.seed, prefill=prefill,
                    tokens=tokens, top_tokens=top_tokens if p.top_n_tokens else None,
                )  # fmt: skip
            body_json = GenerateResponse(generated_text=generated, details=details).model_dump_json()
            return Response(f"[{body_json}]" if as_list else body_json, media_type="application/json")

        return await until_disconnect(raw_request, collect(), [stream])

    async def generate_stream(self, body: GenerateRequest, raw_request: Request) -> Response:
        ids, stream = await self._start(body)
        return EventStream(self._events(body, len(ids), stream), [stream])

    async def _events(self, body: GenerateRequest, input_length: int, stream: RequestStream) -> AsyncIterator[str]:
        p = body.parameters
        index, text = 0, [body.inputs] if p.return_full_text else []
        try:
            async for out in stream:
                c = out.outputs[0]
                text.append(c.text)
                tokens = self._tokens(c)
                tops = self._top_tokens(c, p.top_n_tokens) or [[] for _ in tokens]
                for i, (token, top) in enumerate(zip(tokens, tops)):
                    index += 1
                    event = StreamResponse(index=index, token=token, top_tokens=top)
                    if c.finish_reason is not None and i == len(tokens) - 1:
                        event.generated_text = "".join(text)
                        event.details = StreamDetails(
                            finish_reason=_finish_reason(c), generated_tokens=index, seed=p.seed,
                            input_length=input_length,
                        )  # fmt: skip
                    yield f"data:{event.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent; TGI reports errors in-band
            yield f"data:{json.dumps({'error': str(e), 'error_type': 'generation'})}\n\n"

    async def _start(self, body: GenerateRequest) -> tuple[list[int], RequestStream]:
        arrival = time.monotonic()
        s, p = self.serving, body.parameters
        if p.best_of not in (None, 1) or p.typical_p not in (None, 1.0) or p.watermark or p.adapter_id:
            raise bad_request("best_of > 1, typical_p, watermark and adapter_id are not supported.")
        if p.temperature is not None and p.temperature <= 0:
            raise bad_request("`temperature` must be strictly positive; use do_sample: false for greedy.")
        if p.max_new_tokens is not None and p.max_new_tokens < 1:
            raise bad_request("`max_new_tokens` must be strictly positive.")
        sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        kwargs = dict(
            temperature=(p.temperature or 1.0) if sample else 0.0, top_p=p.top_p or 1.0, top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty or 0.0,
            seed=p.seed, stop=p.stop,
        )  # fmt: skip
        if p.grammar is not None:
            try:
                kwargs["structured_outputs"] = p.grammar.params()
            except ValueError as e:
                raise bad_request(str(e), param="grammar") from None
        params = s.sampling_params(
            kwargs, max_tokens=p.max_new_tokens, logprobs=p.top_n_tokens or 0,
            prompt_logprobs=0 if p.decoder_input_details else None,
        )  # fmt: skip
        ids = s.tokenizer.encode(body.inputs)
        if p.truncate is not None and p.truncate > 0:
            ids = ids[-p.truncate :]
        ids = s.check_prompt(ids, params, param="inputs")
        [stream] = await s.add_all(f"tgi-{uuid.uuid4().hex}", [{"prompt_token_ids": ids}], params, arrival)
        return ids, stream

    def _tokens(self, c: CompletionOutput) -> list[Token]:
        special = set(self.serving.tokenizer.all_special_ids)
        entries = c.logprobs or [None] * len(c.token_ids)
        return [
            Token(id=t, text=self._text(t, e), logprob=e[t].logprob if e else None, special=t in special)
            for t, e in zip(c.token_ids, entries)
        ]

    def _top_tokens(self, c: CompletionOutput, n: Optional[int]) -> list[list[Token]]:
        if not n or not c.logprobs:
            return []
        special = set(self.serving.tokenizer.all_special_ids)
        return [
            [Token(id=t, text=e.decoded_token or "", logprob=e.logprob, special=t in special)
             for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank or 0) if e.rank is not None and e.rank <= n]
            for entry in c.logprobs
        ]  # fmt: skip

    def _prefill(self, ids: list[int], out: RequestOutput) -> list[PrefillToken]:
        entries = out.prompt_logprobs or []
        return [
            PrefillToken(id=t, text=self._text(t, e), logprob=e[t].logprob if e else None) for t, e in zip(ids, entries)
        ]

    def _text(self, token_id: int, entry) -> str:
        if entry and entry[token_id].decoded_token is not None:
            return entry[token_id].decoded_token
        return self.serving.tokenizer.decode_token(token_id)

    def info(self) -> dict:
        s = self.serving
        config = s.engine.config
        return {
            "model_id": s.model_names[0], "model_sha": None, "model_dtype": config.model.dtype,
            "model_device_type": config.device, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.config.max_num_seqs + s.config.max_queued_requests,
            "max_best_of": 1, "max_stop_sequences": 64, "max_input_tokens": s.max_model_len - 1,
            "max_total_tokens": s.max_model_len, "validation_workers": 1, "max_client_batch_size": 1,
            "router": "kvserve", "version": kvserve.__version__, "sha": None, "docker_label": None,
        }  # fmt: skip


def _finish_reason(c: Optional[CompletionOutput]) -> str:
    if c is None or c.finish_reason == "length":
        return "length"
    return "eos_token" if c.stop_reason is None else "stop_sequence"
