"""Sampler and SamplingMetadata: greedy, seeded reproducibility, distribution, filters, penalties, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from kvserve.ops import cpu_ops
from kvserve.sampling_params import SamplingParams
from kvserve.worker.sampler import Sampler, apply_penalties, gather_logprobs
from kvserve.worker.sampling_metadata import SamplingMetadata

V = 32


def build(params, outputs=None, prompts=None, generators=None, vocab_size=V):
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompt_token_ids=prompts or [[] for _ in range(n)],
        output_token_ids=outputs or [[] for _ in range(n)],
        generators=generators or [None] * n,
        vocab_size=vocab_size,
        device="cpu",
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, seed: int = 0, vocab_size: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab_size, generator=seeded(seed)) * 3


def crafted_logits(rows: int) -> tuple[torch.Tensor, list[int]]:
    """Rows with probs 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 on scattered ids (the rest ~0); ids best first."""
    ids = [17, 3, 29, 8, 0, 21]
    logits = torch.full((rows, V), -1e4)
    logits[:, ids] = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]).log()
    return logits, ids


def test_greedy_is_argmax_and_skips_randomness():
    logits = random_logits(5)
    meta = build([SamplingParams(temperature=0.0)] * 5)
    assert meta.all_greedy and meta.top_k is None and meta.penalties is None and meta.max_num_logprobs is None
    out = Sampler()(logits, meta)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None


def test_top_k_1_is_greedy_at_temperature_1():
    logits = random_logits(5, seed=1)
    meta = build([SamplingParams(temperature=1.0, top_k=1)] * 5)
    assert meta.all_greedy
    assert torch.equal(Sampler()(logits, meta).sampled_token_ids, logits.argmax(dim=-1))


def test_input_logits_are_not_modified():
    logits = random_logits(3, seed=2)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3, logit_bias={1: 2.0}, logprobs=2
    )
    Sampler()(logits, build([params] * 3, outputs=[[1, 2]] * 3, prompts=[[3]] * 3))
    assert torch.equal(logits, before)


def _sample_steps(logits_row, params, seed, others, position, steps=4):
    """Tokens the seeded request draws over `steps` steps, sharing each step with `others`."""
    gen = seeded(seed)
    tokens = []
    for step in range(steps):
        rows = list(others)
        rows.insert(position, (params, gen))
        logits = random_logits(len(rows), seed=100 + step)
        logits[position] = logits_row
        meta = build([p for p, _ in rows], generators=[g for _, g in rows])
        tokens.append(Sampler()(logits, meta).sampled_token_ids[position].item())
    return tokens


def test_seeded_rows_reproduce_across_batch_composition_and_position():
    logits_row = random_logits(1, seed=42)[0] / 6  # flat enough that draws vary
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    alone = _sample_steps(logits_row, params, 7, others=[], position=0)
    others = [
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(temperature=1.3, seed=11), seeded(11)),
        (SamplingParams(temperature=0.5, top_k=4), None),
        (SamplingParams(temperature=1.0, min_p=0.2, logprobs=3), None),
        (SamplingParams(temperature=1.0, seed=7), seeded(7)),  # same seed, different request
    ]
    crowded = _sample_steps(logits_row, params, 7, others=others, position=3)
    reversed_crowd = _sample_steps(logits_row, params, 7, others=others[::-1], position=5)
    assert alone == crowded == reversed_crowd
    assert len(set(alone)) > 1  # really random draws, not a constant
    assert _sample_steps(logits_row, params, 8, others=[], position=0) != alone


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distribution_matches_softmax_over_temperature(path, dtype, monkeypatch):
    if path == "reference":  # the torch-native sampler, as on a GPU or without the CPU kernels
        monkeypatch.setattr(cpu_ops, "sample_rows", lambda *args: None)
    torch.manual_seed(0)
    n, temperature = 20000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0]).repeat(n, 1).to(dtype)  # exact in bf16
    meta = build([SamplingParams(temperature=temperature)] * n, vocab_size=6)
    counts = torch.bincount(Sampler()(logits, meta).sampled_token_ids, minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=-1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=3), 3),
        (SamplingParams(top_p=0.6), 2),  # 0.4 < 0.6 <= 0.4 + 0.25
        (SamplingParams(top_p=0.01), 1),
        (SamplingParams(min_p=0.3), 3),  # prob >= 0.3 * 0.4 = 0.12
        (SamplingParams(top_k=3, top_p=0.75), 2),  # renormalized over top 3: 0.5, 0.8125
        (SamplingParams(top_k=4, min_p=0.5), 2),
    ],
)
def test_filters_sample_exactly_the_allowed_set(params, allowed):
    torch.manual_seed(0)
    logits, ids = crafted_logits(2000)
    sampled = Sampler()(logits, build([params] * 2000)).sampled_token_ids
    assert set(sampled.tolist()) == set(ids[:allowed])


def _reference_penalties(logits, prompt, output, presence, frequency, repetition):
    row = logits.tolist()
    for tok in set(prompt) | set(output):
        row[tok] = row[tok] / repetition if row[tok] > 0 else row[tok] * repetition
    for tok in set(output):
        row[tok] -= frequency * output.count(tok) + presence
    return torch.tensor(row)


def test_penalties_follow_the_formulas():
    logits = random_logits(4, seed=3)
    prompts = [[1, 2, 2, 5], [4, 9], [7], [1, 2]]
    outputs = [[5, 5, 6], [9, 9, 9, 3], [], [8]]
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5),
        SamplingParams(),  # no penalty: its tokens are not even sent
    ]
    meta = build(params, outputs=outputs, prompts=prompts)
    assert meta.penalties.prompt_token_ids.shape == (4, 4)
    assert meta.penalties.output_token_ids[3].eq(V).all()
    got = apply_penalties(logits, meta.penalties)
    for i, p in enumerate(params):
        expected = _reference_penalties(
            logits[i], prompts[i], outputs[i], p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        )
        torch.testing.assert_close(got[i], expected)


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 5], logits[:, 6], logits[:, 9] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[6])
    params.all_stop_token_ids = {5, 6}  # eos 5, as the engine fills it
    meta = build([params, params], outputs=[[1, 2], [1, 2, 3]])
    assert meta.min_tokens_mask.rows.tolist() == [0, 0]
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [9, 5]


def test_logit_bias_applies_but_logprobs_stay_raw():
    logits = random_logits(2, seed=4)
    target = int(logits[0].argmin())
    params = [
        SamplingParams(temperature=0.0, logit_bias={target: 100.0}, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    out = Sampler()(logits, build(params))
    assert out.sampled_token_ids.tolist() == [target, int(logits[1].argmax())]
    torch.testing.assert_close(out.logprobs[0, 0], torch.log_softmax(logits[0], -1)[target])
    assert out.sampled_token_ranks[0].item() == V  # the least likely token under the raw logits


def test_logit_bias_outside_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build([SamplingParams(logit_bias={V: 1.0})])


def test_allowed_token_ids_leave_only_those_tokens():
    """A greedy row takes the best allowed token, a random row samples only allowed ones (1,000
    draws), a row without the setting is untouched; logprobs stay raw."""
    logits = random_logits(3, seed=5)
    allowed = [int(i) for i in logits[0].argsort()[:3]]  # the three least likely tokens of row 0
    params = [
        SamplingParams(temperature=0.0, allowed_token_ids=allowed, logprobs=0),
        SamplingParams(temperature=1.0, allowed_token_ids=[4, 9]),
        SamplingParams(temperature=0.0),
    ]
    meta = build(params)
    assert meta.allowed.rows.tolist() == [0, 1] and meta.allowed.banned.sum(1).tolist() == [V - 3, V - 2]
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids.tolist()[0] == max(allowed, key=lambda t: logits[0, t])
    assert out.sampled_token_ids.tolist()[2] == int(logits[2].argmax())
    torch.testing.assert_close(out.logprobs[0, 0], torch.log_softmax(logits[0], -1)[out.sampled_token_ids[0]])
    draws = {Sampler()(logits[1:2], build(params[1:2])).sampled_token_ids.item() for _ in range(1000)}
    assert draws == {4, 9}
    with pytest.raises(ValueError, match="allowed_token_ids \\[32\\] are outside the vocabulary"):
        build([SamplingParams(allowed_token_ids=[1, V])])
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])


def test_bad_words_ban_a_last_token_right_after_the_others():
    """Word [7] is banned everywhere; word [3, 5, 9] bans 9 only after ...3, 5."""
    logits = torch.zeros(3, V)
    logits[:, 9], logits[:, 7], logits[:, 2] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0.0, bad_words=["x"])
    params.bad_words_token_ids = [[7], [3, 5, 9]]  # as the engine fills it from the tokenizer
    meta = build([params] * 3, outputs=[[1, 3, 5], [3, 5, 1], [5]])
    assert sorted(zip(meta.bad_words_mask.rows.tolist(), meta.bad_words_mask.token_ids.tolist())) == [
        (0, 7), (0, 9), (1, 7), (2, 7)
    ]  # fmt: skip
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [2, 9, 9]


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k_order():
    torch.manual_seed(0)
    logits = random_logits(3, seed=5)
    params = [SamplingParams(temperature=1.5), SamplingParams(logprobs=2, top_k=3), SamplingParams(logprobs=5)]
    meta = build(params)
    assert meta.max_num_logprobs == 5
    out = Sampler()(logits, meta)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprob_token_ids.shape == out.logprobs.shape == (3, 6)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.logprob_token_ids))
    for i in range(3):
        best_first = raw[i].argsort(descending=True).tolist()
        assert out.logprob_token_ids[i, 1:].tolist() == best_first[:5]
        assert out.sampled_token_ranks[i].item() == best_first.index(out.sampled_token_ids[i].item()) + 1


def test_gather_logprobs_for_prompt_tokens():
    logprobs = torch.log_softmax(random_logits(4, seed=6), dim=-1)
    targets = torch.tensor([0, 5, 31, 12])
    ids, lps, ranks = gather_logprobs(logprobs, targets, k=0)
    assert ids.tolist() == [[0], [5], [31], [12]]
    torch.testing.assert_close(lps[:, 0], logprobs[torch.arange(4), targets])
    assert ranks.tolist() == [int((row > row[t]).sum()) + 1 for row, t in zip(logprobs, targets.tolist())]


def test_mixed_batch_in_one_call():
    torch.manual_seed(0)
    logits, ids = crafted_logits(6)
    logits[0] = random_logits(1, seed=7)[0]
    eos = ids[0]
    min_tokens = SamplingParams(temperature=0.0, min_tokens=2)
    min_tokens.all_stop_token_ids = {eos}
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=3),
        SamplingParams(top_k=2, logprobs=1),
        SamplingParams(temperature=0.0, repetition_penalty=10.0),  # pushes ids[0] below ids[1]
        SamplingParams(temperature=0.0, logit_bias={ids[5]: 50.0}),
        min_tokens,
    ]
    generators = [None, seeded(3), None, None, None, None]
    meta = build(params, outputs=[[], [], [], [ids[0]], [], [1]], generators=generators)
    assert not meta.all_greedy and not meta.all_random and list(meta.generators) == [1]
    out = Sampler()(logits, meta)
    sampled = out.sampled_token_ids.tolist()
    assert sampled[0] == int(logits[0].argmax())
    alone = Sampler()(logits[1:2], build(params[1:2], generators=[seeded(3)])).sampled_token_ids
    assert sampled[1] == alone.item()
    assert sampled[2] in ids[:2]
    assert sampled[3:] == [ids[1], ids[5], ids[1]]
    assert out.logprobs.shape == (6, 2)
    assert math.isclose(out.logprobs[2, 1].exp().item(), 0.4, rel_tol=1e-4)


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat rows reach past the partial widths, peaked ones do not
def test_partial_top_k_top_p_keeps_the_same_tokens_as_the_full_sort(scale):
    from kvserve.worker.sampler import _top_k_top_p_sorted, apply_top_k_top_p

    torch.manual_seed(0)
    vocab = 6000
    logits = torch.randn(12, vocab) * scale
    top_k = torch.tensor([vocab, 1, 5, 50, 300, 5000, vocab, vocab, 40, 2, vocab, 256])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 1.0, 0.99, 0.3, 1.0, 0.8, 0.7, 0.999, 0.6])
    for k, p in ((top_k, None), (None, top_p), (top_k, top_p), (top_k[5:6], top_p[5:6])):
        rows = logits[: (k if k is not None else p).shape[0]]
        fast, ref = apply_top_k_top_p(rows, k, p), _top_k_top_p_sorted(rows, k, p)
        assert torch.equal(fast.isfinite(), ref.isfinite())
        assert torch.equal(fast[fast.isfinite()], rows[fast.isfinite()])  # kept logits unchanged
