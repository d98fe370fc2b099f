"""Tool calling on /v1/chat/completions through the official `openai` client, on the default model
served with --enable-auto-tool-choice --tool-call-parser hermes (conftest's default_server): three tools
with different parameter schemas; tool_choice "required" (parallel or not) and named give calls whose
arguments validate against their tool's schema; "auto" reads hermes calls out of the text (a regex makes
the model write them); streams assembled from vLLM-shaped deltas equal the non-streamed answers, also
through the client's `stream()` helper; a history with calls and tool results renders through the chat
template; and the 400s."""
from __future__ import annotations

from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
MAX_TOKENS = 150  # a call takes 35-70 tokens here; the margin covers runs of whitespace JSON allows


class GetWeather(BaseModel):
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    timezone: str = Field(max_length=32)


class Add(BaseModel):
    a: int = Field(ge=-1000, le=1000)
    b: int = Field(ge=-1000, le=1000)


SCHEMAS = {"get_weather": GetWeather, "get_time": GetTime, "add": Add}
TOOLS = [  # strict tools, so that the client parses their arguments (parse() and stream())
    openai.pydantic_function_tool(GetWeather, name="get_weather", description="The weather in a city now"),
    openai.pydantic_function_tool(GetTime, name="get_time", description="The time now in a timezone"),
    openai.pydantic_function_tool(Add, name="add", description="Add two integers"),
]
NAMED = {"type": "function", "function": {"name": "get_time"}}
# What "auto" gets the model to write (the regex makes it), as Qwen2.5 writes calls.
HERMES_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>\n"
)
HERMES_REGEX = "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in HERMES_TEXT)


def ask(client, question: str, **kwargs):
    kwargs.setdefault("max_completion_tokens", MAX_TOKENS)
    messages = kwargs.pop("messages", [{"role": "user", "content": question}])
    return client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, **kwargs)


def answer(response) -> tuple:
    """(content, [(name, arguments)], finish_reason) of a non-streamed response's only choice."""
    [choice] = response.choices
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    return choice.message.content, calls, choice.finish_reason


def streamed(chunks) -> tuple:
    """The same, assembled from a stream's deltas, checking vLLM's delta shape on the way: a call's
    first delta carries index, id, type and name with arguments "", the next ones only argument text."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.id is not None:
                    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
                    assert call.index == len(calls) and call.function.name and call.function.arguments == ""
                    calls.append((call.function.name, ""))
                else:
                    assert call.type is None and call.function.name is None and call.function.arguments
                    calls[call.index] = (calls[call.index][0], calls[call.index][1] + call.function.arguments)
            finish = choice.finish_reason or finish
    return content or None, calls, finish


def check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        SCHEMAS[name].model_validate_json(arguments)  # raises unless the arguments follow the tool's schema


def test_required_gives_calls_whose_arguments_validate_streamed_alike(default_client):
    parallel = ask(default_client, "What is 2 plus 3?", tool_choice="required")
    content, calls, finish = answer(parallel)
    assert content is None and finish == "tool_calls"
    check_calls(calls)
    ids = [c.id for c in parallel.choices[0].message.tool_calls]
    assert all(i.startswith("chatcmpl-tool-") for i in ids) and len(set(ids)) == len(ids)
    assert streamed(ask(default_client, "What is 2 plus 3?", tool_choice="required", stream=True)) == answer(parallel)
    # Without parallel calls: one (maxItems 1). The client's parse() reads strict tools' arguments into models.
    one = default_client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}], tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_completion_tokens=MAX_TOKENS,
    )  # fmt: skip
    [call] = one.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, SCHEMAS[call.function.name])
    check_calls([(call.function.name, call.function.arguments)])


def test_named_choice_calls_that_function_and_streams_through_the_clients_helper(default_client):
    named = ask(default_client, "What is the weather in Paris?", tool_choice=NAMED)
    content, calls, finish = answer(named)
    assert content is None and finish == "tool_calls" and [name for name, _ in calls] == ["get_time"]
    check_calls(calls)
    with default_client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        tool_choice=NAMED, temperature=0, max_completion_tokens=MAX_TOKENS,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == calls[0]
    assert isinstance(call.function.parsed_arguments, GetTime) and final.choices[0].finish_reason == "tool_calls"
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.arguments) for e in done] == calls


def test_auto_reads_hermes_calls_out_of_the_text(default_client):
    forced = {"structured_outputs": {"regex": HERMES_REGEX}}
    auto = ask(default_client, "What is the weather in Paris?", tool_choice="auto", extra_body=forced)
    assert answer(auto) == ("Let me check.", [("get_weather", '{"city": "Paris", "unit": "celsius"}')], "tool_calls")
    chunks = ask(default_client, "What is the weather in Paris?", extra_body=forced, stream=True)
    assert streamed(chunks) == answer(auto)  # tool_choice left out: "auto", since tools are given
    # With "none" the same text is the content, as written.
    none = ask(default_client, "What is the weather in Paris?", tool_choice="none", extra_body=forced)
    assert answer(none) == (HERMES_TEXT, [], "stop")
    # An answer without calls is content, as without tools.
    plain = ask(default_client, "Say hello.", max_completion_tokens=8)
    content, calls, finish = answer(plain)
    assert content and calls == [] and finish == "length"
    no_tools = default_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_completion_tokens=8
    )
    assert no_tools.choices[0].message.content == content  # SmolLM2's template does not show tools


def test_auto_without_parallel_calls_gives_the_first_call_only(default_client):
    second = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>\n'
    regex = HERMES_REGEX + "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in second)
    forced = {"structured_outputs": {"regex": regex}}
    both = ask(default_client, "Weather and time?", extra_body=forced)
    assert [name for name, _ in answer(both)[1]] == ["get_weather", "get_time"]
    one = ask(default_client, "Weather and time?", parallel_tool_calls=False, extra_body=forced)
    assert answer(one) == ("Let me check.", answer(both)[1][:1], "tool_calls")
    chunks = ask(default_client, "Weather and time?", parallel_tool_calls=False, extra_body=forced, stream=True)
    assert streamed(chunks) == answer(one)


def test_history_with_calls_and_tool_results_renders_through_the_template(default_server, default_client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    weather = {"type": "function", "function": {"name": "get_weather"}}
    first = ask(default_client, "", messages=[question], tool_choice=weather)
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}
    # The answer's message object goes back as it came: content null, its tool_calls.
    follow = ask(default_client, "", messages=[question, first.choices[0].message, result], max_completion_tokens=4)
    assert follow.choices[0].message.content and follow.choices[0].finish_reason == "length"
    history = [question, first.choices[0].message.model_dump(exclude_unset=True), result]
    tokenized = httpx.post(f"{default_server.url}/tokenize", json={"messages": history}, timeout=30).json()
    assert tokenized["count"] == follow.usage.prompt_tokens
    text = httpx.post(f"{default_server.url}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=30).json()
    # (detokenized without the special <|im_start|> / <|im_end|>): the call's turn, empty, then the result
    assert "What is the weather in Paris?\nassistant\n\ntool\n18 C and sunny\nassistant\n" in text["prompt"]


@pytest.mark.parametrize(
    "fields,param,words",
    [({"tools": None, "tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
     ({"tool_choice": {"type": "function", "function": {"name": "get_wether"}}}, "tool_choice",
      "tool_choice names the function 'get_wether', which is not in tools (get_weather, get_time, add)"),
     ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
      "cannot be combined with response_format"),
     ({"tool_choice": "any"}, "tool_choice", 'send "none", "auto", "required" or {"type": "function", "function"'),
     ({"tools": [{"type": "function"}]}, "tools.0.function", "tools.0.function: Field required"),
     ({"tools": TOOLS + TOOLS[:1]}, "tools", "two functions are named 'get_weather'"),
     ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
       "tool_choice": "required"}, "tools",
      "tools: the JSON schema made of the tools' parameters does not compile: Unsupported type \"no-such-type\""),
     ({"messages": [{"role": "assistant", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "add", "arguments": "a=1"}}]}]},
      "messages", "messages.0.tool_calls.0.function.arguments must be JSON text"),
     ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages.0", "a tool message needs tool_call_id")],
)  # fmt: skip
def test_errors_are_400s_naming_the_field(default_client, fields, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, **fields}
    if body["tools"] is None:
        del body["tools"]
    for stream in (False, True):  # never a 200 stream carrying the error
        with pytest.raises(openai.BadRequestError) as bad:
            default_client.chat.completions.create(**body, stream=stream, max_completion_tokens=4)
        assert bad.value.status_code == 400 and bad.value.body["param"] == param
        assert words in bad.value.body["message"], bad.value.body["message"]
