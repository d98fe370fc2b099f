"""hermes: calls in `<tool_call>` blocks, as Hermes 2 Pro, Qwen2.5 / Qwen3 and SmolLM2 write them:

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block holds one call object or a list of them (SmolLM2 writes `<tool_call>[{...}, {...}]</tool_call>`).
Text outside the blocks is content; a block whose JSON is not a call stays in the content as written.
The last block may lack its `</tool_call>` when generation stopped right after the JSON.
"""
from __future__ import annotations

from kvserve.entrypoints.openai.tool_parsers.base import (
    ToolCallView,
    ToolParser,
    ToolView,
    calls_from_json,
    held,
    partial_marker_len,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def scan(self, text: str, final: bool) -> ToolView:
        content: list[str] = []
        calls: list[ToolCallView] = []
        pos, after_call = 0, False
        while True:
            start = text.find(START, pos)
            if start < 0:  # the rest is content, but for a marker being written
                rest = text[pos:] if final else text[pos : len(text) - partial_marker_len(text[pos:], START)]
                content.append(held(rest, final, after_call))
                break
            end = text.find(END, start)
            if end < 0 and not final:  # an open block: it and the whitespace before it wait
                content.append(held(text[pos:start], False, after_call))
                break
            body_end, block_end = (len(text), len(text)) if end < 0 else (end, end + len(END))
            found = calls_from_json(text[start + len(START) : body_end])
            before = held(text[pos:start], True, after_call)
            if found is None:
                content.append(before + text[start:block_end])
            else:
                content.append(before.rstrip())
                calls += found
            pos, after_call = block_end, found is not None
        return ToolView("".join(content), tuple(calls))
