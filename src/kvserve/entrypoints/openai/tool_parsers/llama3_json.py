"""llama3_json: Llama 3.1 / 3.2's JSON calls. The answer opens with a call object, after an optional
`<|python_tag|>`; several are separated by `;`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

("arguments" is taken as well as "parameters"). An answer that opens with anything else is all content;
from the first object that is not a call (or anything that is not `;` between objects), the rest is.
"""
from __future__ import annotations

from kvserve.entrypoints.openai.tool_parsers.base import (
    ToolCallView,
    ToolParser,
    ToolView,
    after_opening_tag,
    calls_from_json,
    held,
)
from kvserve.entrypoints.openai.tool_parsers.json_scan import bracket_end, skip_space

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def scan(self, text: str, final: bool) -> ToolView:
        i = after_opening_tag(text, TAG, final)
        if i is None:
            return ToolView()
        calls: list[ToolCallView] = []
        while i < len(text) and text[i] == "{":
            end = bracket_end(text, i)
            if end is None and not final:  # an unfinished object waits
                return ToolView("", tuple(calls))
            found = calls_from_json(text[i:end]) if end is not None else None
            if found is None:
                break
            calls += found
            i = skip_space(text, end)
            if text.startswith(";", i):
                i = skip_space(text, i + 1)
            elif i < len(text):
                break
        if not calls:
            return ToolView(text if final else held(text, False, False), ())
        return ToolView(held(text[i:], final, after_call=True), tuple(calls))
