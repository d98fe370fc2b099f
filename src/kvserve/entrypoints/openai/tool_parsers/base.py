"""What every tool-call parser shares. A parser reads the text a model generated and tells the content
(the text meant for the user) from the tool calls in it.

The one method a parser writes is `scan(text, final)`: the ToolView of the text generated so far, the
content and the calls that no later text can change. Views are monotone: as the text grows, the content
only grows at its end, calls are only appended, a call's name never changes and its arguments only grow
at their end. So a scan leaves out what later text could still decide (a half-written marker, whitespace
that may turn out to stand before a call, a call not yet closed); with final=True no more text comes and
it decides everything. Both APIs follow from that rule: `extract_tool_calls` is one final scan, and
`ToolCallStream` sends the difference between successive views, so that the deltas of a stream assemble
to what `extract_tool_calls` returns for the same text, however the text was cut into pieces.
"""
from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from kvserve.entrypoints.openai.tool_parsers.json_scan import skip_space


@dataclass(frozen=True)
class ToolCallView:
    name: str
    arguments: str  # JSON text; while streaming, possibly unfinished


@dataclass(frozen=True)
class ToolView:
    content: str = ""
    calls: tuple[ToolCallView, ...] = ()


@dataclass(frozen=True)
class ExtractedToolCalls:
    content: Optional[str]  # None when the text holds nothing but calls
    calls: list[ToolCallView]


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call. A call's first delta carries its name and arguments "";
    the next ones carry only argument fragments."""

    index: int
    arguments: str
    name: Optional[str] = None


@dataclass(frozen=True)
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser(ABC):
    name: ClassVar[str] = ""
    # Its markers are special tokens, which detokenizing would drop (vLLM keeps them for Mistral too).
    needs_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def scan(self, text: str, final: bool) -> ToolView:
        """The monotone view of `text` (see the module docstring)."""

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        view = self.scan(text, final=True)
        return ExtractedToolCalls(view.content or None, list(view.calls))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    @staticmethod
    def new_call_id() -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCallStream:
    """One answer's text, fed as it is generated; each feed returns what is new since the last one."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.view = ToolView()

    def feed(self, text: str, final: bool = False) -> StreamDelta:
        self.text += text
        old, new = self.view, self.parser.scan(self.text, final)
        _check_monotone(self.parser, old, new)
        self.view = new
        deltas = []
        for index, call in enumerate(new.calls):
            sent = ""
            if index < len(old.calls):
                sent = old.calls[index].arguments
            else:
                deltas.append(ToolCallDelta(index, "", name=call.name))
            if len(call.arguments) > len(sent):
                deltas.append(ToolCallDelta(index, call.arguments[len(sent) :]))
        return StreamDelta(new.content[len(old.content) :], deltas)


def _check_monotone(parser: ToolParser, old: ToolView, new: ToolView) -> None:
    grows = new.content.startswith(old.content) and len(new.calls) >= len(old.calls)
    grows = grows and all(
        a.name == b.name and b.arguments.startswith(a.arguments) for a, b in zip(old.calls, new.calls)
    )
    if not grows:
        raise RuntimeError(f"tool parser {parser.name!r} took back streamed text: {old} -> {new}")


# -- helpers the parsers share ---------------------------------------------------------------------


def call_from_object(obj: Any) -> Optional[ToolCallView]:
    """{"name": str, "arguments" (or "parameters"): object or its JSON text} as a call; None if not one.
    Arguments are written back with json.dumps(ensure_ascii=False), as vLLM does."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if "arguments" in obj and "parameters" in obj:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCallView(obj["name"], json.dumps(arguments, ensure_ascii=False))


def calls_from_json(text: str) -> Optional[list[ToolCallView]]:
    """A JSON call object, or a non-empty list of them, as calls; None if `text` is anything else."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_from_object(item) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (0 if none): text that may
    still become the marker, so a scan that is not final holds it back."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def after_opening_tag(text: str, tag: str, final: bool) -> Optional[int]:
    """Where an answer that may open with `tag` (after whitespace) starts, past the tag; None while a scan
    that is not final cannot tell yet (nothing but whitespace so far, or the tag being written)."""
    i = skip_space(text, 0)
    if text.startswith(tag, i):
        i = skip_space(text, i + len(tag))
    elif not final and tag.startswith(text[i:]):
        return None
    return None if i == len(text) and not final else i


def held(segment: str, final: bool, after_call: bool) -> str:
    """A stretch of content as a view shows it: whitespace next to a call is not content (after a call:
    leading; before one: trailing, which a scan that is not final holds, since a call may follow)."""
    if after_call:
        segment = segment.lstrip()
    return segment if final else segment.rstrip()
