"""The answers of tool_choice "required" and of a named function, which the grammar writes as JSON
(tool_choice.py builds the schemas), read as calls while they are generated:

- named: the whole answer is the function's arguments;
- required: `[{"name": "get_weather", "parameters": {"city": "Paris"}}, ...]`, one element per call.

A call's arguments are the JSON text the model wrote, as it wrote it (so they stream a fragment per
token, and the streamed calls equal the final ones to the character). An answer cut short (max_tokens)
keeps the calls begun, the last with unfinished arguments.
"""
from __future__ import annotations

import json
from typing import Optional

from kvserve.entrypoints.openai.tool_parsers.base import ToolCallView, ToolParser, ToolView
from kvserve.entrypoints.openai.tool_parsers.json_scan import skip_space, string_end, value_end


class NamedToolParser(ToolParser):
    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def scan(self, text: str, final: bool) -> ToolView:
        return ToolView("", (ToolCallView(self.function, text),))


class RequiredToolParser(ToolParser):
    name = "required"

    def scan(self, text: str, final: bool) -> ToolView:
        calls: list[ToolCallView] = []
        i = skip_space(text, 0)
        if not text.startswith("[", i):
            return ToolView()
        i += 1
        while True:
            i = skip_space(text, i)
            if text.startswith(",", i):
                i += 1
                continue
            if not text.startswith("{", i):  # "]", or the end of the text so far
                break
            call, i = _element(text, i)
            if call is not None:
                calls.append(call)
            if i is None:  # the element is unfinished
                break
        return ToolView("", tuple(calls))


def _element(text: str, i: int) -> tuple[Optional[ToolCallView], Optional[int]]:
    """The call of the element {"name": ..., "parameters": ...} at text[i] (None until its name is
    complete), and the index past it (None while it is unfinished). The arguments are the raw text of
    "parameters" so far."""
    name: Optional[str] = None
    arguments, i = "", i + 1
    while True:
        i = skip_space(text, i)
        if i >= len(text) or text[i] != '"':
            done = text.startswith("}", i)
            break
        key_end = string_end(text, i)
        if key_end is None:
            done = False
            break
        key = json.loads(text[i:key_end])
        i = skip_space(text, key_end)
        if not text.startswith(":", i):
            done = False
            break
        i = skip_space(text, i + 1)
        end = value_end(text, i) if i < len(text) else None
        if key == "parameters":
            arguments = text[i:end] if end is not None else text[i:]
        elif key == "name" and end is not None:
            name = json.loads(text[i:end])
        if end is None:
            done = False
            break
        i = skip_space(text, end)
        if text.startswith(",", i):
            i += 1
    call = ToolCallView(name, arguments) if isinstance(name, str) else None
    return call, (i + 1 if done else None)
