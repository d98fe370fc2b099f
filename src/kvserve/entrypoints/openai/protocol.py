"""Pydantic request and response models of the OpenAI-compatible API (OpenAI's field names and shapes,
plus vLLM's sampling extras). Requests forbid unknown fields, so a typo gets a 400 naming it rather
than being silently ignored. Checking value ranges is SamplingParams' job, not these models'."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from kvserve.entrypoints.openai.structured_outputs import (
    CONSTRAINT_FIELDS,
    JsonSchema,
    ResponseFormat,
    StructuredOutputsRequest,
    structured_outputs_params,
)
from kvserve.entrypoints.openai.tool_choice import ChatCompletionTool, ToolCall, ToolChoice


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- shared request parts ---------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions. None means "the default"."""

    model: Optional[str] = Field(None, description="A name from /v1/models; omitted: the served model.")
    n: int = Field(1, description="Completions to generate per prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, description="0 is greedy. Default 1.")
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> bias.")
    user: Optional[str] = None
    # vLLM's extras.
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: Optional[int] = Field(
        None, description="Keep the prompt's last k tokens (-1: max_model_len)."
    )
    allowed_token_ids: Optional[list[int]] = Field(None, description="Sample only among these token ids.")
    bad_words: Optional[list[str]] = Field(None, description="Words never to generate.")
    # Structured output: at most one constraint among these (structured_outputs.py).
    response_format: Optional[ResponseFormat] = Field(None, description="OpenAI's: json_object or json_schema.")
    structured_outputs: Optional[StructuredOutputsRequest] = Field(None, description="vLLM's (in extra_body).")
    guided_json: Optional[JsonSchema] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams arguments these fields set (defaults where None); not max_tokens/logprobs."""
        chosen = {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "seed": self.seed, "stop": self.stop, "stop_token_ids": self.stop_token_ids,
            "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "truncate_prompt_tokens": self.truncate_prompt_tokens, "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
        }  # fmt: skip
        kwargs = {k: v for k, v in chosen.items() if v is not None}
        if self.logit_bias:
            try:
                kwargs["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids, e.g. {\"50256\": -100}.") from None
        guided = {"guided_json": self.guided_json, "guided_regex": self.guided_regex,
                  "guided_choice": self.guided_choice, "guided_grammar": self.guided_grammar}  # fmt: skip
        constraint = structured_outputs_params(self.response_format, self.structured_outputs, guided)
        if constraint is not None:
            kwargs["structured_outputs"] = constraint
        return kwargs

    def constraint_fields(self) -> list[str]:
        """The structured-output fields this request sets."""
        return [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]


# --- /v1/completions --------------------------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="Text, a list of texts, token ids, or a list of token-id lists."
    )
    max_tokens: Optional[int] = Field(16, description="None: up to the context length.")
    logprobs: Optional[int] = Field(None, description="Return the top-k logprobs of each token (0 to 20).")
    echo: bool = Field(False, description="Prepend the prompt to the returned text.")
    suffix: Optional[str] = Field(None, description="Not supported; must be omitted.")


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None  # "stop" | "length"; null while streaming


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed completion; `usage` only with stream_options.include_usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# --- /v1/chat/completions ---------------------------------------------------------------------------


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="An assistant's calls; its content may be null.")
    tool_call_id: Optional[str] = Field(None, description="A tool message: the id of the call it answers.")

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id: the id of the call whose result it carries")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, description="None: up to the context length.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, description="With logprobs: how many alternatives (0 to 20).")
    # vLLM's extras.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # Tool calling (tool_choice.py): the default tool_choice is "auto" when tools are given.
    tools: Optional[list[ChatCompletionTool]] = None
    tool_choice: Optional[ToolChoice] = Field(None, description='"none", "auto", "required" or a named function.')
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one call (required). Default true.")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _known_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError('send "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
        return value


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """A call's first delta: index, id, type, function.name (arguments ""); then index and argument fragments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...} or
        # {"tool_calls": [...]}, then {}.
        delta: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls is not None:
            delta["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return delta


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


# --- models, tokenizer, errors ----------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvserve"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestModel):
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="Text to tokenize; or give messages.")
    messages: Optional[list[ChatMessage]] = Field(None, description="A conversation, rendered by the chat template.")
    add_special_tokens: bool = Field(True, description="For prompt: add BOS etc. as the model does.")
    add_generation_prompt: bool = Field(True, description="For messages: end with the assistant's turn header.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
