"""The request side of tool calling without a server: tools / tool_choice resolved into a plan (the
template's tools, the JSON schema of "required" and named choices as vLLM builds it, the parser), every
error naming its field and what to send; and a history with tool calls and results rendered by a chat
template that reads them (arguments as objects, as transformers' templates expect)."""
from __future__ import annotations

import json

import pytest
import tokenizers
from pydantic import ValidationError

from kvserve.engine.tokenizer import Tokenizer
from kvserve.entrypoints.openai.errors import from_value_error
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest
from kvserve.entrypoints.openai.serving_engine import chat_conversation
from kvserve.entrypoints.openai.tool_choice import NO_PARAMETERS, plan_tools
from kvserve.entrypoints.openai.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function",
     "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Weather in Paris?"}], **fields)


def plan(auto_parser="hermes", **fields):
    r = request(**fields)
    return plan_tools(r.tools, r.tool_choice, r.parallel_tool_calls, r.constraint_fields(), auto_parser)


def error(auto_parser="hermes", **fields):
    with pytest.raises(ValueError) as info:
        plan(auto_parser, **fields)
    api_error = from_value_error(info.value)
    assert api_error.status == 400
    return api_error.param, api_error.message


def test_required_builds_vllms_schema():
    p = plan(tools=TOOLS, tool_choice="required")
    assert isinstance(p.parser, RequiredToolParser) and p.template_tools == TOOLS
    assert p.constraint.json == {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": WEATHER},
             "required": ["name", "parameters"]},
            {"properties": {"name": {"type": "string", "enum": ["get_time"]}, "parameters": NO_PARAMETERS},
             "required": ["name", "parameters"]},
        ]},
    }  # fmt: skip
    assert plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).constraint.json["maxItems"] == 1


def test_required_moves_defs_to_the_top_and_refuses_clashes():
    unit = {"enum": ["celsius", "fahrenheit"]}
    with_defs = {"type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "$defs": {"Unit": unit}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": with_defs}}]
    schema = plan(tools=tools, tool_choice="required").constraint.json
    assert schema["$defs"] == {"Unit": unit} and "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert with_defs["$defs"] == {"Unit": unit}  # the request's own schema is left alone
    other = {"type": "object", "$defs": {"Unit": {"enum": ["kelvin"]}}}
    tools.append({"type": "function", "function": {"name": "g", "parameters": other}})
    assert error(tools=tools, tool_choice="required") == (
        "tools", 'tools: two functions define $defs.Unit differently; give them different names, as tool_choice '
        '"required" puts all definitions in one schema.')  # fmt: skip


def test_named_choice_constrains_to_its_parameters():
    p = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert isinstance(p.parser, NamedToolParser) and p.parser.function == "get_weather"
    assert p.constraint.json == WEATHER
    no_params = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert no_params.constraint.json == NO_PARAMETERS


def test_auto_none_and_defaults():
    auto = plan(tools=TOOLS)  # tools without tool_choice: "auto", as in vLLM and OpenAI
    assert isinstance(auto.parser, HermesToolParser) and auto.constraint is None and auto.template_tools == TOOLS
    none = plan(tools=TOOLS, tool_choice="none")  # the template still sees the tools (vLLM's default)
    assert none.parser is None and none.constraint is None and none.template_tools == TOOLS
    assert plan(tool_choice="none") == plan()  # and without tools, nothing
    assert plan().template_tools is None and plan().parser is None
    untyped = plan(tools=[{"function": {"name": "get_time"}}], tool_choice="none")  # "type" may be left out
    assert untyped.template_tools == [TOOLS[1]]
    empty = plan(tools=[], tool_choice="required")  # OpenAI answers an empty list as with "none"
    assert empty.parser is None and empty.constraint is None
    # auto may still be steered by a structured-output constraint (the parser reads what it allows)
    steered = plan(tools=TOOLS, tool_choice="auto", structured_outputs={"regex": "<tool_call>.*"})
    assert isinstance(steered.parser, HermesToolParser) and steered.constraint is None


def test_auto_with_a_strict_tool_and_hermes_constrains_calls_by_a_structural_tag():
    strict_tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
    auto = plan(tools=strict_tools)
    tag = json.loads(auto.constraint.structural_tag)
    assert isinstance(auto.parser, HermesToolParser) and tag["triggers"] == ["<tool_call>"]
    assert [(s["begin"], s["schema"], s["end"]) for s in tag["structures"]] == [
        ('<tool_call>\n{"name": "get_weather", "arguments": ', WEATHER, "}\n</tool_call>"),
        ('<tool_call>\n{"name": "get_time", "arguments": ', {"type": "object"}, "}\n</tool_call>"),  # not strict
    ]
    assert plan(tools=TOOLS).constraint is None  # no strict tool: free text, as before
    assert plan("llama3_json", tools=strict_tools).constraint is None  # a parser without a tag form
    steered = plan(tools=strict_tools, structured_outputs={"regex": "<tool_call>.*"})
    assert steered.constraint is None  # the request's own constraint: the parser reads what it allows


def test_errors_name_the_field_and_what_to_send():
    assert error(tool_choice="required") == (
        "tool_choice", "tool_choice needs tools: send the functions the model may call in `tools`.")
    param, message = error(auto_parser=None, tools=TOOLS)
    assert param == "tool_choice" and "--enable-auto-tool-choice --tool-call-parser NAME" in message
    assert "hermes, llama3_json, mistral or pythonic" in message and 'send tool_choice "required"' in message
    assert error(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_wether"}}) == (
        "tool_choice", "tool_choice names the function 'get_wether', which is not in tools (get_weather, get_time); "
        "name one of those.")  # fmt: skip
    param, message = error(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert param == "tool_choice" and message == (
        "tool_choice \"required\" constrains the answer to the tools' JSON schema, so it cannot be combined with "
        "response_format; drop those, or use tool_choice \"auto\".")
    param, message = error(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                           guided_regex="a")  # fmt: skip
    assert "for the function 'get_time'" in message and "guided_regex" in message
    assert error(tools=TOOLS + TOOLS[:1], tool_choice="none") == (
        "tools", "tools: two functions are named 'get_weather'; give each a different name.")


@pytest.mark.parametrize(
    "fields,words",
    [({"tools": [{"type": "function"}]}, ["tools.0.function", "Field required"]),
     ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, ["tools.0.type"]),
     ({"tools": [{"function": {"name": ""}}]}, ["tools.0.function.name"]),
     ({"tools": [{"function": {"name": "f", "parameters": "{}"}}]}, ["tools.0.function.parameters"]),
     ({"tools": TOOLS, "tool_choice": "any"}, ["tool_choice", 'send "none", "auto", "required" or {"type"']),
     ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "f"}}, ["tool_choice"])],
)  # fmt: skip
def test_malformed_tools_are_validation_errors(fields, words):
    with pytest.raises(ValidationError) as info:
        request(**fields)
    for word in words:
        assert word in str(info.value)


# --- the history through a chat template ------------------------------------------------------------

# Qwen2.5's way of showing tools, calls and results, cut down.
TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments.city }})"
    "</tool_call>{% endfor %}{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{% endfor %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "18 C, sunny"},
]  # fmt: skip


def test_history_with_calls_and_results_renders_through_the_template():
    r = request(tools=TOOLS, tool_choice="none")
    r.messages[:] = ChatCompletionRequest(messages=HISTORY).messages
    conversation = chat_conversation(r.messages)
    assert conversation[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert conversation[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call-1"}  # fmt: skip
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = Tokenizer(backend, bos_token=None, eos_token=None, chat_template=TEMPLATE)
    text = tokenizer.apply_chat_template(conversation, tools=plan(tools=TOOLS).template_tools, tokenize=False)
    assert text == (  # the tools as the client sent them
        f"<tools>{json.dumps(TOOLS[0])};{json.dumps(TOOLS[1])};</tools>\n"
        "<|user|>Weather in Paris?<|assistant|><tool_call>get_weather(Paris)</tool_call><|tool|>18 C, sunny[call-1]"
    )


def test_history_errors():
    with pytest.raises(ValidationError, match="a tool message needs tool_call_id"):
        ChatCompletionRequest(messages=[{"role": "tool", "content": "18 C"}])
    with pytest.raises(ValidationError, match="only assistant messages carry tool_calls, not user messages"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]}])
    bad = [{**HISTORY[1], "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "city=Paris"}}]}]
    with pytest.raises(ValueError, match=r"messages.0.tool_calls.0.function.arguments must be JSON text"):
        chat_conversation(ChatCompletionRequest(messages=bad).messages)
