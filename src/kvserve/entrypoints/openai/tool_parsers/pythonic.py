"""pythonic: calls as a Python list of function calls with keyword arguments, as Llama 3.2 and Llama 4
write them (Llama 4 between `<|python_start|>` and `<|python_end|>`):

    [get_weather(city="Paris", days=3), get_time(zone='CET')]

Argument values are Python literals (strings, numbers, True / False / None, lists, dicts) and become
JSON. An answer that opens with anything else is all content; so is a list that is not all such calls
(it is read once it closes). Text after the list is content.
"""
from __future__ import annotations

import ast
import json
from typing import Optional

from kvserve.entrypoints.openai.tool_parsers.base import ToolCallView, ToolParser, ToolView, after_opening_tag, held
from kvserve.entrypoints.openai.tool_parsers.json_scan import bracket_end, skip_space

START, END = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def scan(self, text: str, final: bool) -> ToolView:
        i = after_opening_tag(text, START, final)
        if i is None:
            return ToolView()
        if i < len(text) and text[i] == "[":
            end = bracket_end(text, i, quotes="\"'")
            if end is None and not final:  # the list waits until it closes
                return ToolView()
            calls = _calls(text[i:end]) if end is not None else None
            if calls is not None:
                j = skip_space(text, end)
                if text.startswith(END, j):
                    j += len(END)
                elif not final and END.startswith(text[j:]):
                    j = len(text)
                return ToolView(held(text[j:], final, after_call=True), tuple(calls))
        return ToolView(text if final else held(text, False, False), ())


def _calls(source: str) -> Optional[list[ToolCallView]]:
    try:
        tree = ast.parse(source, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = [_call(node) for node in tree.elts]
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return None
    return None if any(call is None for call in calls) else calls  # type: ignore[return-value]


def _call(node: ast.expr) -> Optional[ToolCallView]:
    """f(a=1, b="x") or module.f(...) as a call; None for anything else (positional arguments too).
    Raises ValueError / TypeError for a value that is not a literal or has no JSON form."""
    if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
        return None
    name = _dotted(node.func)
    if name is None:
        return None
    arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return ToolCallView(name, json.dumps(arguments, ensure_ascii=False, allow_nan=False))


def _dotted(node: ast.expr) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None
