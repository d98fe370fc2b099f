"""Tokenizer: a Hugging Face-like tokenizer over `tokenizers.Tokenizer`, loaded from an HF folder or a GGUF file.

`Tokenizer` offers the part of the HF tokenizer API that vLLM user code reaches through `llm.get_tokenizer()`:
encode/decode, token <-> id lookups, the special tokens and `apply_chat_template`. Encoding rules (pre-tokenizer,
special tokens, BOS) all live in the `tokenizers` backend; this class only adds the metadata around it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors


@dataclass
class TokenizerOutput:
    """What `Tokenizer.__call__` returns: the ids, named as HF's `BatchEncoding` names them."""

    input_ids: list[int]


class Tokenizer:
    """HF-like tokenizer. Special tokens are given as strings and must be in the backend's vocabulary.

    `eos_token_ids` holds every id that ends generation: the eos token's id first, then the ones
    generation_config.json adds (deduplicated, in order).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: Optional[str],
        eos_token: Optional[str],
        pad_token: Optional[str] = None,
        chat_template: Optional[str] = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self.convert_tokens_to_ids(bos_token) if bos_token else None
        self.eos_token_id = self.convert_tokens_to_ids(eos_token) if eos_token else None
        self.pad_token_id = self.convert_tokens_to_ids(pad_token) if pad_token else None
        eos_ids = [self.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        special = {i: t.content for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids: list[int] = sorted(special)
        self.all_special_tokens: list[str] = [special[i] for i in self.all_special_ids]
        self.chat_template = chat_template
        # decode_token decodes after this text so that a decoder that strips the first leading space
        # (sentencepiece's) keeps the space the token really contributes.
        self._anchor_ids = backend.encode("a", add_special_tokens=False).ids
        self._anchor_text = backend.decode(self._anchor_ids, skip_special_tokens=False)

    # -- encoding and decoding -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> TokenizerOutput:
        return TokenizerOutput(self.encode(text, add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """The text one token adds to the output (for logprobs). A token holding part of a
        multi-byte character shows as U+FFFD."""
        text = self.backend.decode([*self._anchor_ids, token_id], skip_special_tokens=False)
        return text[len(self._anchor_text) :]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Union[str, list[str]]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[Optional[int], list[Optional[int]]]:
        """Ids of vocabulary entries (raw token strings, e.g. "Ġhello"); None for an unknown token."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as HF defines it)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- chat template ---------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> Union[str, list[int]]:
        """Render `conversation` with the model's (or the given) Jinja chat template, as transformers does.

        With continue_final_message the text ends right after the last message's content, so that
        the model continues it. Extra kwargs become template variables. Returns the prompt text, or
        its ids when tokenize (the template writes any BOS itself, so none is added).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "This tokenizer has no chat template; pass one with chat_template=... "
                "(a Jinja string, as in the model's tokenizer_config.json)."
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set.")
        messages = [dict(message) for message in conversation]
        if continue_final_message:
            # Mark the end of the final message, render, then cut the text at the mark.
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs a final message with string content.")
            messages[-1]["content"] += _CONTINUE_MARK
        special_tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        text = _compile_template(template).render(
            {**special_tokens, **kwargs},
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
        )
        if continue_final_message:
            if _CONTINUE_MARK not in text:
                raise ValueError("continue_final_message: the chat template dropped the end of the final message.")
            text = text[: text.rindex(_CONTINUE_MARK)]
        return self.encode(text, add_special_tokens=False) if tokenize else text


_CONTINUE_MARK = "\x00CONTINUE_FINAL_MESSAGE\x00"


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """The same sandboxed environment, filters and globals that transformers gives chat templates."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which would corrupt prompts.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# -- loading ---------------------------------------------------------------------------------------


def load_tokenizer(path: str) -> Tokenizer:
    """Load from a Hugging Face model folder (tokenizer.json, ...) or from a .gguf file's vocabulary."""
    location = Path(path)
    if location.is_dir():
        return _load_hf_folder(location)
    if location.suffix == ".gguf":
        from kvserve.engine.gguf_tokenizer import load_gguf_tokenizer  # it builds on this module


        return load_gguf_tokenizer(location)
    raise ValueError(f"Cannot load a tokenizer from {path!r}: expected a model folder or a .gguf file.")


def _load_hf_folder(folder: Path) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
    # Like transformers: an explicit add_bos_token / add_eos_token overrides tokenizer.json's post-processor.
    if "add_bos_token" in config or "add_eos_token" in config:
        backend.post_processor = add_special_processor(
            backend,
            special["bos_token"] if config.get("add_bos_token") else None,
            special["eos_token"] if config.get("add_eos_token") else None,
        )
    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id") or []
    return Tokenizer(
        backend,
        **special,
        chat_template=_hf_chat_template(folder, config),
        extra_eos_token_ids=[generation_eos] if isinstance(generation_eos, int) else generation_eos,
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_text(token: Union[None, str, dict[str, Any]]) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken."""
    return token["content"] if isinstance(token, dict) else token


def _hf_chat_template(folder: Path, config: dict[str, Any]) -> Optional[str]:
    """Newer transformers save chat_template.jinja; older ones put it in tokenizer_config.json,
    either as a string or as a list of named templates (we take "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        return next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def add_special_processor(
    backend: tokenizers.Tokenizer, bos: Optional[str], eos: Optional[str]
) -> processors.TemplateProcessing:
    """Post-processor that puts `bos` before and `eos` after the text (either may be None)."""
    prefix, suffix = [bos] if bos else [], [eos] if eos else []
    return processors.TemplateProcessing(
        single=" ".join([*prefix, "$A", *suffix]),
        pair=" ".join([*prefix, "$A", *suffix, *prefix, "$B:1", *suffix]),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(prefix + suffix)],
    )
