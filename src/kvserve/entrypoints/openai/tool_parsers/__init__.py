"""Tool-call parsers: each reads the calls out of one model family's text (`--tool-call-parser NAME`,
vLLM's names), for tool_choice "auto". `forced` reads the JSON answers of "required" and named choices.
Pure Python, no tokenizer: parsers work on the detokenized text."""
from __future__ import annotations

from kvserve.entrypoints.openai.tool_parsers.base import ToolParser
from kvserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from kvserve.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from kvserve.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from kvserve.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}
TOOL_PARSER_NAMES = tuple(TOOL_PARSERS)


def get_tool_parser(name: str) -> ToolParser:
    """The parser named `name`; ValueError naming the known ones otherwise."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"Unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSER_NAMES)}.")
    return TOOL_PARSERS[name]()
