"""SamplingMetadata: one step's sampling parameters as batch tensors, built once per step by the runner.

Row i describes the i-th request that samples this step. Every optional field is None when no row
asks for that feature, so the sampler skips the work entirely. Per-row settings that do not apply
to a row hold their neutral value (top_k = V, top_p = 1, min_p = 0, penalties 0 / 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvserve.sampling_params import SamplingParams


@dataclass
class SparseLogitUpdate:
    """Values added to a few (row, token) entries of the [B, V] logits."""

    rows: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [N] int64, each in [0, V)
    values: torch.Tensor  # [N] float32


@dataclass
class AllowedTokens:
    """The rows that sample only among their allowed_token_ids, and every other token, banned."""

    rows: torch.Tensor  # [R] int64
    banned: torch.Tensor  # [R, V] bool: True where the row may not sample


@dataclass
class PenaltyInputs:
    """Inputs of the repetition, frequency and presence penalties (as in HF / vLLM)."""

    presence: torch.Tensor  # [B] float32, 0 = off
    frequency: torch.Tensor  # [B] float32, 0 = off
    repetition: torch.Tensor  # [B] float32, 1 = off
    # Token ids padded with V (one past the vocabulary); rows without penalties are all padding.
    prompt_token_ids: torch.Tensor  # [B, P] int64; P = 0 when no row has a repetition penalty
    output_token_ids: torch.Tensor  # [B, O] int64


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so dividing by it is always safe
    greedy: torch.Tensor  # [B] bool: temperature 0 or top_k 1, the row takes the argmax
    all_greedy: bool
    all_random: bool
    # Filters of the random rows (greedy rows hold the neutral value); None: no row filters.
    top_k: Optional[torch.Tensor]  # [B] int64 in [1, V]
    top_p: Optional[torch.Tensor]  # [B] float32 in (0, 1]
    min_p: Optional[torch.Tensor]  # [B] float32 in [0, 1]
    penalties: Optional[PenaltyInputs]
    logit_bias: Optional[SparseLogitUpdate]
    # -inf on every stop token id of the rows that have generated fewer than min_tokens tokens.
    min_tokens_mask: Optional[SparseLogitUpdate]
    allowed: Optional[AllowedTokens]
    # -inf on each bad word's last token in the rows whose output ends with the word's other tokens.
    bad_words_mask: Optional[SparseLogitUpdate]
    # Seeded random rows: row -> its request's generator (on the logits' device).
    generators: dict[int, torch.Generator]
    max_num_logprobs: Optional[int]  # K: the largest `logprobs` any row asked for; None: no row asked

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[Optional[torch.Generator]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Tensors for a batch whose row i samples the next token of the request with params[i].

        generators[i] is the request's own generator (seeded requests) or None (default generator).
        Raises ValueError if a logit_bias or stop token id lies outside [0, vocab_size).
        """
        greedy = [p.greedy for p in params]
        floats = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        longs = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731

        top_k = [vocab_size if g or p.top_k == 0 else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        asked_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=floats([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=longs(top_k) if any(k < vocab_size for k in top_k) else None,
            top_p=floats(top_p) if any(p < 1.0 for p in top_p) else None,
            min_p=floats(min_p) if any(p > 0.0 for p in min_p) else None,
            penalties=_build_penalties(params, prompt_token_ids, output_token_ids, vocab_size, device),
            logit_bias=_build_logit_bias(params, vocab_size, device),
            min_tokens_mask=_build_min_tokens_mask(params, output_token_ids, vocab_size, device),
            allowed=_build_allowed(params, vocab_size, device),
            bad_words_mask=_build_bad_words_mask(params, output_token_ids, vocab_size, device),
            generators={i: gen for i, gen in enumerate(generators) if gen is not None and not greedy[i]},
            max_num_logprobs=max(asked_logprobs, default=None),
        )


def _has_penalty(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _build_penalties(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    vocab_size: int,
    device: torch.device | str,
) -> Optional[PenaltyInputs]:
    if not any(_has_penalty(p) for p in params):
        return None
    # The prompt matters only to the repetition penalty; rows without penalties send no tokens.
    prompts = [list(ids) if p.repetition_penalty != 1.0 else [] for p, ids in zip(params, prompt_token_ids)]
    outputs = [list(ids) if _has_penalty(p) else [] for p, ids in zip(params, output_token_ids)]
    return PenaltyInputs(
        presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
        repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
        prompt_token_ids=_pad(prompts, vocab_size, device),
        output_token_ids=_pad(outputs, vocab_size, device),
    )


def _pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    """[len(rows), longest row] int64, each row right-padded with pad_id."""
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad_id] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=device).reshape(len(rows), width)


def _build_logit_bias(
    params: list[SamplingParams], vocab_size: int, device: torch.device | str
) -> Optional[SparseLogitUpdate]:
    triples = [(i, tok, bias) for i, p in enumerate(params) for tok, bias in (p.logit_bias or {}).items()]
    return _sparse_update(triples, vocab_size, device, what="logit_bias")


def _build_min_tokens_mask(
    params: list[SamplingParams], output_token_ids: list[list[int]], vocab_size: int, device: torch.device | str
) -> Optional[SparseLogitUpdate]:
    triples = [
        (i, tok, float("-inf"))
        for i, (p, out) in enumerate(zip(params, output_token_ids))
        if len(out) < p.min_tokens
        for tok in sorted(p.all_stop_token_ids)
    ]
    return _sparse_update(triples, vocab_size, device, what="stop")


def _build_allowed(params: list[SamplingParams], vocab_size: int, device: torch.device | str) -> Optional[AllowedTokens]:
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    pairs = [(r, tok) for r, i in enumerate(rows) for tok in params[i].allowed_token_ids]  # (mask row, token)
    bad = [tok for _, tok in pairs if not 0 <= tok < vocab_size]
    if bad:
        raise ValueError(f"allowed_token_ids {bad} are outside the vocabulary [0, {vocab_size}).")
    # Made where it is used: only the allowed entries cross from the host, not an [R, V] mask.
    banned = torch.ones(len(rows), vocab_size, dtype=torch.bool, device=device)
    banned[tuple(torch.tensor(pairs, dtype=torch.long, device=device).T)] = False
    return AllowedTokens(rows=torch.tensor(rows, dtype=torch.long, device=device), banned=banned)


def _build_bad_words_mask(
    params: list[SamplingParams], output_token_ids: list[list[int]], vocab_size: int, device: torch.device | str
) -> Optional[SparseLogitUpdate]:
    """A word of one token is always banned; a longer one's last token only right after its others."""
    triples = [
        (i, word[-1], float("-inf"))
        for i, (p, out) in enumerate(zip(params, output_token_ids))
        for word in p.bad_words_token_ids
        if len(word) == 1 or (len(out) >= len(word) - 1 and list(out[len(out) - len(word) + 1 :]) == word[:-1])
    ]
    return _sparse_update(triples, vocab_size, device, what="bad_words")


def _sparse_update(
    triples: list[tuple[int, int, float]], vocab_size: int, device: torch.device | str, what: str
) -> Optional[SparseLogitUpdate]:
    if not triples:
        return None
    bad = [tok for _, tok, _ in triples if not 0 <= tok < vocab_size]
    if bad:
        raise ValueError(f"{what} token ids {bad} are outside the vocabulary [0, {vocab_size}).")
    rows, token_ids, values = zip(*triples)
    return SparseLogitUpdate(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        values=torch.tensor(values, dtype=torch.float32, device=device),
    )
