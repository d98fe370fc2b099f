"""mistral: calls after the `[TOOL_CALLS]` token, in either of Mistral's forms:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]            (v3 tokenizers)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}     (v11+; [ARGS] optional)

Text before the first `[TOOL_CALLS]` is content. `[TOOL_CALLS]` is a special token, so the server keeps
special tokens in the text of requests parsed with it (as vLLM does). Mistral's chat templates check
that call ids are 9 letters or digits, so this parser's ids are.
"""
from __future__ import annotations

import json
import random
import re
import string
from typing import Union

from kvserve.entrypoints.openai.tool_parsers.base import (
    ToolCallView,
    ToolParser,
    ToolView,
    call_from_object,
    calls_from_json,
    held,
    partial_marker_len,
)
from kvserve.entrypoints.openai.tool_parsers.json_scan import bracket_end, skip_space

MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_WAIT = "wait"  # the group is not finished; a scan that is not final holds it


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> ToolView:
        first = text.find(MARK)
        if first < 0:
            rest = text if final else text[: len(text) - partial_marker_len(text, MARK)]
            return ToolView(held(rest, final, False), ())
        calls: list[ToolCallView] = []
        pos = first
        while text.startswith(MARK, pos):
            found, end = _group(text, pos + len(MARK), final)
            if found == _WAIT:
                return ToolView(text[:first].rstrip(), tuple(calls))
            if found is None:
                break
            calls += found
            pos = skip_space(text, end)
        if not calls:  # the first group is not a call: all is content
            return ToolView(text if final else held(text, False, False), ())
        tail = text[pos:] if final else text[pos : len(text) - partial_marker_len(text[pos:], MARK)]
        return ToolView(text[:first].rstrip() + held(tail, final, True), tuple(calls))

    @staticmethod
    def new_call_id() -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def _group(text: str, i: int, final: bool) -> tuple[Union[list[ToolCallView], str, None], int]:
    """The calls of one `[TOOL_CALLS]` group starting at text[i], and where it ends; (None, i) if it is
    not a call, (_WAIT, i) while it is unfinished."""
    i = skip_space(text, i)
    if i == len(text):
        return (None if final else _WAIT), i
    if text[i] in "[{":
        end = bracket_end(text, i)
        if end is None:
            return (None if final else _WAIT), i
        return calls_from_json(text[i:end]), end
    name = _NAME.match(text, i)
    if name is None:
        return None, i
    j = name.end()
    if ARGS.startswith(text[j:]):  # the name, or [ARGS], is still being written
        return (None if final else _WAIT), i
    if text.startswith(ARGS, j):
        j += len(ARGS)
    if j == len(text):
        return (None if final else _WAIT), i
    end = bracket_end(text, j) if text[j] == "{" else None
    if end is None:
        return (None if final or text[j] != "{" else _WAIT), i
    try:
        call = call_from_object({"name": name.group(), "arguments": json.loads(text[j:end])})
    except ValueError:
        call = None
    return ([call], end) if call is not None else (None, i)
