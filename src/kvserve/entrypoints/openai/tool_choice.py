"""A chat request's `tools` and `tool_choice`, checked and resolved once per request into a ToolPlan:
the tools the chat template sees, the constraint on the answer and the parser that reads calls out of it.

- "none": the template still sees the tools (as vLLM does); the answer is content.
- "auto" (the default when tools are given): the answer is free text; the server's --tool-call-parser
  reads the calls out of it, so it needs --enable-auto-tool-choice and --tool-call-parser. With the
  hermes parser and a tool marked `strict`, a structural tag makes every `<tool_call>` block the
  answer opens a call of one of the tools, a strict one's arguments under its parameters schema
  (unless the request has its own output constraint).
- "required": the answer is a JSON array of {"name", "parameters"} objects under a JSON schema built
  from the tools (as vLLM builds it: minItems 1, maxItems 1 when parallel_tool_calls is false).
- {"type": "function", "function": {"name": ...}}: the answer is that function's arguments, under its
  parameters schema.
Errors are ValueErrors whose message starts with the field's name and says what to send instead (the
server answers them with a 400 naming the field).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from kvserve.entrypoints.openai.tool_parsers import get_tool_parser
from kvserve.entrypoints.openai.tool_parsers.base import ToolParser
from kvserve.entrypoints.openai.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvserve.sampling_params import StructuredOutputsParams

# A function without `parameters` takes an empty object.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Strict):
    name: str = Field(..., min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON schema of the arguments object.")
    strict: Optional[bool] = Field(
        None, description="Arguments follow the schema: always for required and named choices, for auto with hermes."
    )


class ChatCompletionTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(..., description="The arguments object as JSON text.")


class ToolCall(_Strict):
    """A call the assistant made: in responses, and in the history a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


@dataclass(frozen=True)
class ToolPlan:
    template_tools: Optional[list[dict[str, Any]]]  # the chat template's `tools`: as sent, with "type"
    parser: Optional[ToolParser]  # None: the answer is content, as without tools
    # required / named: the calls' JSON schema; auto with strict tools (hermes): a structural tag
    constraint: Optional[StructuredOutputsParams] = None
    call_ids: Optional[ToolParser] = None  # whose new_call_id makes the ids (Mistral's templates check them)


def plan_tools(
    tools: Optional[list[ChatCompletionTool]],
    tool_choice: Optional[ToolChoice],
    parallel_tool_calls: Optional[bool],
    other_constraints: list[str],
    auto_parser: Optional[str],
) -> ToolPlan:
    """The plan for one request. other_constraints: the request's structured-output fields that are set;
    auto_parser: the server's --tool-call-parser when --enable-auto-tool-choice is on, else None."""
    if tools is None:
        if tool_choice is not None and tool_choice != "none":
            raise ValueError("tool_choice needs tools: send the functions the model may call in `tools`.")
        return ToolPlan(None, None)
    _check_tools(tools)
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    call_ids = get_tool_parser(auto_parser) if auto_parser else None
    if not tools and tool_choice in (None, "required"):  # OpenAI answers as with "none"
        tool_choice = "none"
    choice = tool_choice or "auto"
    if choice == "none":
        return ToolPlan(template_tools, None)
    if choice == "auto":
        if auto_parser is None:
            raise ValueError(
                'tool_choice "auto" (the default when tools are given) needs the server started with '
                "--enable-auto-tool-choice --tool-call-parser NAME (hermes, llama3_json, mistral or pythonic); "
                'or send tool_choice "required", "none" or {"type": "function", "function": {"name": ...}}.'
            )
        strict = None
        if auto_parser == "hermes" and any(t.function.strict for t in tools) and not other_constraints:
            strict = StructuredOutputsParams(structural_tag=hermes_structural_tag(tools))
        return ToolPlan(template_tools, call_ids, strict, call_ids=call_ids)
    if other_constraints:
        raise ValueError(
            f"tool_choice {_show(choice)} constrains the answer to the tools' JSON schema, so it cannot be combined "
            f"with {', '.join(other_constraints)}; drop those, or use tool_choice \"auto\"."
        )
    if choice == "required":
        schema = required_schema(tools, parallel_tool_calls is not False)
        return ToolPlan(template_tools, RequiredToolParser(), StructuredOutputsParams(json=schema), call_ids)
    assert isinstance(choice, NamedToolChoice)
    named = next((t.function for t in tools if t.function.name == choice.function.name), None)
    if named is None:
        names = ", ".join(t.function.name for t in tools)
        raise ValueError(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools ({names}); "
            "name one of those."
        )
    schema = named.parameters or NO_PARAMETERS
    return ToolPlan(template_tools, NamedToolParser(named.name), StructuredOutputsParams(json=schema), call_ids)


def hermes_structural_tag(tools: list[ChatCompletionTool]) -> dict[str, Any]:
    """vLLM's structural-tag form for hermes calls: free text until `<tool_call>`, then
    `\n{"name": "<a tool>", "arguments": ` + an object (a strict tool's under its parameters schema,
    any object for the others) + `}\n</tool_call>`, as the hermes parser reads them."""
    structures = [
        {"begin": f'<tool_call>\n{{"name": {json.dumps(t.function.name)}, "arguments": ',
         "schema": (t.function.parameters or NO_PARAMETERS) if t.function.strict else {"type": "object"},
         "end": "}\n</tool_call>"}
        for t in tools
    ]  # fmt: skip
    return {"structures": structures, "triggers": ["<tool_call>"]}


def required_schema(tools: list[ChatCompletionTool], parallel: bool) -> dict[str, Any]:
    """A JSON array of one or more {"name": <a tool's name>, "parameters": <its arguments>} objects. The
    tools' `$defs` move to the top, where their `#/$defs/...` references point."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        parameters = dict(tool.function.parameters or NO_PARAMETERS)
        for name, schema in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, schema) != schema:
                raise ValueError(f"tools: two functions define $defs.{name} differently; give them different "
                                 "names, as tool_choice \"required\" puts all definitions in one schema.")
        items.append({
            "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
            "required": ["name", "parameters"],
        })  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _check_tools(tools: list[ChatCompletionTool]) -> None:
    seen: set[str] = set()
    for tool in tools:
        name = tool.function.name
        if name in seen:
            raise ValueError(f"tools: two functions are named {name!r}; give each a different name.")
        seen.add(name)


def _show(choice: ToolChoice) -> str:
    return f'"{choice}"' if isinstance(choice, str) else f"for the function {choice.function.name!r}"
