"""Tool-call parsers without a server: each format's calls and content read from model-style text
(several calls, content around them, malformed JSON left as content), and the same text streamed whole,
a character at a time, cut where a byte-level BPE tokenizer (SmolLM2's, Qwen's) cuts words, and at random
points: the deltas always assemble to exactly what the non-streaming parser returns."""
from __future__ import annotations

import json
import random
import re
import string

import pytest

from kvserve.entrypoints.openai.tool_parsers import TOOL_PARSER_NAMES, get_tool_parser
from kvserve.entrypoints.openai.tool_parsers.base import ToolCallView, ToolParser, ToolView
from kvserve.entrypoints.openai.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvserve.entrypoints.openai.tool_parsers.mistral import MistralToolParser

WEATHER = '{"city": "Paris", "unit": "celsius"}'
TIME = '{"timezone": "Europe/Paris"}'
CALLS = [("get_weather", WEATHER), ("get_time", TIME)]
# GPT-2's pre-tokenizer pattern (ASCII classes, digits one by one, as SmolLM2's): a token never crosses
# these pieces, so they are what a step's detokenized text looks like at its coarsest.
PRE_TOKENS = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z\u00c0-\u024f]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")

# (parser, model text, expected content, expected calls as (name, arguments JSON text))
CASES = [
    # Qwen2.5 / Qwen3 / Hermes 2 Pro
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "get_time", "arguments": {TIME}}}\n</tool_call>', None, CALLS),
    ("hermes", f'I will check the weather for you.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}'
               "\n</tool_call>", "I will check the weather for you.", CALLS[:1]),
    # SmolLM2: a list in one block
    ("hermes", f'<tool_call>[{{"name": "get_weather", "arguments": {WEATHER}}}, '
               f'{{"name": "get_time", "arguments": {TIME}}}]</tool_call>', None, CALLS),
    # generation stopped right after the JSON: the last block lacks its end marker
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n', None, CALLS[:1]),
    # malformed JSON (a brace short) stays content, as written; a valid call beside it is read
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}\n</tool_call>',
     f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}\n</tool_call>', []),
    ("hermes", f'<tool_call>\n{{"name": "get_time", "arguments": {TIME}}}\n</tool_call>\nand '
               '<tool_call>{"name": "get_weather", "arguments": "city=Paris"}</tool_call>',
     'and <tool_call>{"name": "get_weather", "arguments": "city=Paris"}</tool_call>', CALLS[1:]),
    ("hermes", "Use <b> for bold; 2 < 3 and <tool_", "Use <b> for bold; 2 < 3 and <tool_", []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>',
     None, [("get_weather", '{"city": "Zürich"}')]),
    # Llama 3.1 / 3.2 JSON
    ("llama3_json", f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
                    f'{{"name": "get_time", "parameters": {TIME}}}', None, CALLS),
    ("llama3_json", f' {{"name": "get_weather", "arguments": {WEATHER}}}', None, CALLS[:1]),
    ("llama3_json", '{"city": "Paris"} is the JSON you asked for.', '{"city": "Paris"} is the JSON you asked for.', []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {WEATHER}',
     f'{{"name": "get_weather", "parameters": {WEATHER}', []),
    ("llama3_json", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    # Mistral 7B v0.3 (v3 tokenizer) and v11+ tokenizers
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
                f'{{"name": "get_time", "arguments": {TIME}}}]', None, CALLS),
    ("mistral", f"Let me look.[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]get_time{TIME}", "Let me look.",
     CALLS),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": }]',
     '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": }]', []),
    # Llama 3.2 / Llama 4 pythonic
    ("pythonic", "[get_weather(city='Paris', unit=\"celsius\"), get_time(timezone='Europe/Paris')]", None, CALLS),
    ("pythonic", "<|python_start|>[search(query='a [b] \"c\"', tags=['x', 'y'], exact=True, limit=None)]"
                 "<|python_end|>", None,
     [("search", '{"query": "a [b] \\"c\\"", "tags": ["x", "y"], "exact": true, "limit": null}')]),
    ("pythonic", "[get_weather('Paris')]", "[get_weather('Paris')]", []),  # positional: not a call
    ("pythonic", "[1] Paris is the capital of France.", "[1] Paris is the capital of France.", []),
]  # fmt: skip


def assemble(parser: ToolParser, pieces: list[str]) -> tuple:
    """Stream `pieces` through the parser and put the deltas together as a client would."""
    stream = parser.stream()
    content, calls = "", []
    for i, piece in enumerate(pieces):
        delta = stream.feed(piece, final=i == len(pieces) - 1)
        content += delta.content
        for call in delta.tool_calls:
            if call.name is not None:
                assert call.index == len(calls) and call.arguments == ""  # a call opens with its name alone
                calls.append([call.name, ""])
            else:
                assert call.name is None and call.arguments
                calls[call.index][1] += call.arguments
    return content or None, [tuple(call) for call in calls]


def cuts(text: str) -> dict[str, list[str]]:
    by_token = PRE_TOKENS.findall(text)
    assert "".join(by_token) == text
    variants = {"whole": [text], "chars": list(text), "tokens": by_token}
    for seed in range(3):
        rng = random.Random(seed)
        points = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
        variants[f"random{seed}"] = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    return variants


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_calls_and_content_whole_and_streamed(name, text, content, calls):
    parser = get_tool_parser(name)
    found = parser.extract_tool_calls(text)
    assert found.content == content
    assert [(c.name, c.arguments) for c in found.calls] == calls
    for call in found.calls:
        assert isinstance(json.loads(call.arguments), dict)
    for how, pieces in cuts(text).items():
        assert assemble(parser, pieces) == (content, calls), how


def test_streamed_content_comes_before_the_answer_ends():
    parser = get_tool_parser("hermes")
    stream = parser.stream()
    assert stream.feed("The weather\n").content == "The weather"  # whitespace waits: a call may follow
    assert stream.feed("in Paris <tool").content == "\nin Paris"  # "<tool" may open a call
    delta = stream.feed(f'_call>{{"name": "get_weather", "arguments": {WEATHER}}}</tool_call>')
    assert delta.content == "" and [(c.name, c.arguments) for c in delta.tool_calls] == [("get_weather", ""),
                                                                                       (None, WEATHER)]


def test_required_answers_stream_their_arguments_as_written():
    parser = RequiredToolParser()
    # as xgrammar lets the model write it: free whitespace, elements in schema order
    text = f'[{{"name": "get_weather", "parameters": {{\n    "city": "Paris",\n    "unit": "celsius"\n}}}},\n  ' \
           f'{{"name":"get_time","parameters":{TIME} }}]'
    found = parser.extract_tool_calls(text)
    assert found.content is None
    assert [(c.name, json.loads(c.arguments)) for c in found.calls] == [(n, json.loads(a)) for n, a in CALLS]
    assert found.calls[0].arguments == '{\n    "city": "Paris",\n    "unit": "celsius"\n}'
    for how, pieces in cuts(text).items():
        assert assemble(parser, pieces) == (None, [(c.name, c.arguments) for c in found.calls]), how
    # cut short by max_tokens: the calls begun, the last one unfinished
    cut = '[{"name": "get_weather", "parameters": {"city": "Par'
    assert parser.extract_tool_calls(cut).calls == [ToolCallView("get_weather", '{"city": "Par')]
    assert parser.extract_tool_calls('[{"name": "get_wea').calls == []


def test_named_answers_are_the_arguments():
    parser = NamedToolParser("get_weather")
    assert parser.extract_tool_calls(WEATHER).calls == [ToolCallView("get_weather", WEATHER)]
    stream = parser.stream()
    first = stream.feed('{"city"')
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("get_weather", ""), (None, '{"city"')]
    assert [c.arguments for c in stream.feed(': "Paris"}', final=True).tool_calls] == [': "Paris"}']


def test_registry_and_ids():
    assert TOOL_PARSER_NAMES == ("hermes", "llama3_json", "mistral", "pythonic")
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("qwen")
    assert get_tool_parser("hermes").new_call_id().startswith("chatcmpl-tool-")
    mistral_id = MistralToolParser.new_call_id()  # Mistral's templates accept only these
    assert len(mistral_id) == 9 and set(mistral_id) <= set(string.ascii_letters + string.digits)
    assert MistralToolParser.needs_special_tokens and not get_tool_parser("hermes").needs_special_tokens


def test_a_parser_that_takes_back_streamed_text_is_caught():
    class Fickle(ToolParser):
        name = "fickle"

        def scan(self, text: str, final: bool) -> ToolView:
            return ToolView(text if len(text) < 3 else text.upper())

    stream = Fickle().stream()
    stream.feed("ab")
    with pytest.raises(RuntimeError, match="took back streamed text"):
        stream.feed("c")
