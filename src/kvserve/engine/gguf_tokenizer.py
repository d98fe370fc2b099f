"""A Tokenizer from a GGUF file's vocabulary: byte-level BPE (gpt2 family, with llama.cpp's
pre-tokenizer regexes by tokenizer.ggml.pre) or sentencepiece BPE (llama), plus special tokens,
BOS handling, end-of-turn ids and the chat template stored in the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from kvserve.engine.tokenizer import Tokenizer, add_special_processor
from kvserve.model.gguf_loader import read_gguf

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


def load_gguf_tokenizer(path: Path) -> Tokenizer:
    fields = read_gguf(str(path)).fields
    meta = {name: value for name, value in fields.items() if name.startswith("tokenizer.")}
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
        backend.post_processor = add_special_processor(backend, bos, None)
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
