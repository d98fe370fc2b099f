"""Prompt types, as vLLM names them (`from vllm.inputs import TokensPrompt` -> `from kvserve.inputs import ...`).

A prompt is a string, a list of token ids, or one of these dicts."""
from __future__ import annotations

from typing import TypedDict, Union


class TextPrompt(TypedDict):
    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    prompt: str  # optional: shown back in RequestOutput.prompt, never tokenized


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]
