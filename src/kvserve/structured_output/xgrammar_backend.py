"""The one place that speaks xgrammar: the tokenizer's vocabulary as xgrammar's TokenizerInfo, each kind
of StructuredOutputsParams compiled to a CompiledGrammar, matchers, and the token bitmask.

xgrammar imports transformers (and torch) when imported, so this module is imported only when the first
constraint is compiled, on the manager's compile thread. Compiler errors become ValueErrors carrying
xgrammar's own message (minus its log prefix), which the server answers with a 400.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import torch
import xgrammar as xgr

from kvserve.sampling_params import StructuredOutputsParams

# Threads one grammar's compilation may use (xgrammar's default is 8; the server's CPUs run the model).
COMPILER_THREADS = 2
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: ... : ".
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class XgrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        """tokenizer: kvserve's Tokenizer (a `tokenizers` backend); vocab_size: the model's logits width
        (ids past the tokenizer's vocabulary are never allowed); stop_token_ids: the ids that end a
        grammar (the engine's EOS ids)."""
        self.vocab_size = max(vocab_size, len(tokenizer))
        info = _tokenizer_info(tokenizer, self.vocab_size, list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Raises ValueError with the compiler's message if the constraint does not compile."""
        any_whitespace = not params.disable_any_whitespace
        try:
            if params.kind == "json":
                schema = params.json if isinstance(params.json, dict) else json.loads(params.json)
                if params.disable_additional_properties:
                    schema = no_additional_properties(schema)
                return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=any_whitespace)
            if params.kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if params.kind == "regex":
                return self.compiler.compile_regex(params.regex)
            if params.kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(params.choice))
            if params.kind == "structural_tag":
                tag = structural_tag_format(json.loads(params.structural_tag), params.disable_any_whitespace)
                return self.compiler.compile_structural_tag(tag)
            return self.compiler.compile_grammar(params.grammar)
        except (RuntimeError, TypeError, ValueError, KeyError) as e:
            raise ValueError(f"structured_outputs.{params.kind} does not compile: {compiler_message(e)}") from None

    @staticmethod
    def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """[num_rows, ceil(vocab_size / 32)] int32 on the host, every token allowed."""
        return xgr.allocate_token_bitmask(num_rows, self.vocab_size)


def _tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """What xgrammar's TokenizerInfo.from_huggingface derives, from the `tokenizers` backend itself: the
    encoded vocabulary by id, the vocabulary type and whether a space is prepended (read from the
    backend's JSON, and checked against the vocabulary as xgrammar does)."""
    vocab = tokenizer.get_vocab()
    encoded = [""] * len(tokenizer)
    for token, token_id in vocab.items():
        if token_id < len(encoded):
            encoded[token_id] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
    vocab_type, add_prefix_space = meta["vocab_type"], meta["add_prefix_space"]
    from_vocab = xgr.TokenizerInfo._detect_vocab_type_from_vocab(vocab)
    if from_vocab is not None and from_vocab != vocab_type:
        vocab_type = from_vocab
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False)[:1])
        space = "▁" if vocab_type == xgr.VocabType.BYTE_FALLBACK else "Ġ"
        add_prefix_space = bool(first) and first[0].startswith(space)
    return xgr.TokenizerInfo(
        encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids, add_prefix_space=add_prefix_space
    )


def structural_tag_format(tag: dict[str, Any], compact: bool) -> dict[str, Any]:
    """A structural tag in xgrammar's format. vLLM's form (structures of begin / schema / end, and
    triggers) becomes what xgrammar makes of it (StructuralTag.from_legacy_structural_tag: triggered
    tags, each a JSON schema between its begin and end); with compact (disable_any_whitespace) each
    schema's whitespace runs are at most one character. xgrammar's own form is left as it is."""
    if "structures" not in tag:
        return tag
    limit = {"max_whitespace_cnt": 1} if compact else {}
    tags = [
        {"type": "tag", "begin": s["begin"], "end": s["end"],
         "content": {"type": "json_schema", "json_schema": s.get("schema", {}), **limit}}
        for s in tag["structures"]
    ]  # fmt: skip
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []),
                                                 "tags": tags}}  # fmt: skip


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose strings are exactly `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def no_additional_properties(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema has additionalProperties: false."""
    if isinstance(schema, list):
        return [no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema, not a schema itself
            out[key] = {name: no_additional_properties(s) for name, s in value.items()}
        elif key in _LITERALS:
            out[key] = value
        else:
            out[key] = no_additional_properties(value)
    kind = out.get("type")
    if kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out:
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LITERALS = ("enum", "const", "default", "examples")


def compiler_message(error: Exception) -> str:
    return _LOG_PREFIX.sub("", str(error).strip())
