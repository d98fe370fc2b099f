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
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from kvserve.model.gguf_loader import read_gguf


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
        return _load_gguf(location)
    raise ValueError(f"Cannot load a tokenizer from {path!r}: expected a model folder or a .gguf file.")


def _load_hf_folder(folder: Path) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
    # Like transformers: an explicit add_bos_token / add_eos_token overrides tokenizer.json's post-processor.
    if "add_bos_token" in config or "add_eos_token" in config:
        backend.post_processor = _add_special_processor(
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


def _add_special_processor(
    backend: tokenizers.Tokenizer, bos: Optional[str], eos: Optional[str]
) -> processors.TemplateProcessing:
    """Post-processor that puts `bos` before and `eos` after the text (either may be None)."""
    prefix, suffix = [bos] if bos else [], [eos] if eos else []
    return processors.TemplateProcessing(
        single=" ".join([*prefix, "$A", *suffix]),
        pair=" ".join([*prefix, "$A", *suffix, *prefix, "$B:1", *suffix]),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(prefix + suffix)],
    )


# GGUF token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Byte-level BPE pre-tokenization by tokenizer.ggml.pre: the regexes llama.cpp applies in order, each
# splitting the pieces the previous one left (as HF's Split(..., "isolated")); written as in each
# model's tokenizer.json. "smollm" and its group first cut every digit out alone.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# As llama-bpe, but every digit alone.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_BYTE_LEVEL_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
}


def _load_gguf(path: Path) -> Tokenizer:
    fields = read_gguf(str(path)).fields
    meta = {name: field.contents() for name, field in fields.items() if name.startswith("tokenizer.")}
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        backend = _byte_level_backend(meta)
    elif model == "llama":
        backend = _sentencepiece_backend(meta)
    else:
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' and 'llama').")
    # Control tokens (<|im_start|>, <s>) are special: matched whole, dropped by skip_special_tokens.
    # User-defined ones (<think>) are matched whole but kept in decoded text, as transformers does.
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types) if kind == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    )

    def token(key: str) -> Optional[str]:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    if bos and meta.get("tokenizer.ggml.add_bos_token", model == "llama"):
        backend.post_processor = _add_special_processor(backend, bos, None)
    # End-of-turn and end-of-message tokens end generation too, as in llama.cpp (Llama 3's <|eot_id|>).
    end_keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    end_of_turn = [meta[key] for key in end_keys if key in meta]
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        extra_eos_token_ids=end_of_turn,
    )


def _byte_level_backend(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE: tokens are spelled in the byte-to-unicode alphabet, merges are given."""
    # Files older than the key are read as plain GPT-2, as transformers reads them.
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _BYTE_LEVEL_SPLITS:
        raise NotImplementedError(f"GGUF byte-level pre-tokenizer {pre!r} is not supported.")
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in _BYTE_LEVEL_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """Sentencepiece BPE (llama, mistral), as the models' own tokenizer.json spells it: spaces become
    "▁" and one "▁" is prepended (so " hi" is "▁▁hi", as in sentencepiece and llama.cpp), bytes outside
    the vocabulary fall back to <0xNN> tokens. Merges are rebuilt from the token scores."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, scores),
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space_to_meta = normalizers.Replace(" ", "▁")
    meta_to_space = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), space_to_meta])
        backend.decoder = decoders.Sequence(meta_to_space + [decoders.Strip(" ", 1, 0)])
    else:
        backend.normalizer = space_to_meta
        backend.decoder = decoders.Sequence(meta_to_space)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary entries, best-scoring merged token first; ties are
    broken as transformers' generate_merges breaks them (longer left piece, longer right piece, id order)."""
    ranked = []
    for token, token_id in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                key = (-scores[token_id], -len(left), -len(right), token_id, vocab[left], vocab[right])
                ranked.append((key, left, right))
    ranked.sort()
    return [(left, right) for _, left, right in ranked]
