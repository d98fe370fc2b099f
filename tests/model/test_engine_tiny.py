"""The whole engine on the tiny random model: sampling semantics, batching invariance, preemption,
aborts, rejection. Fast: the model is a few MB."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


PROMPTS = ["Hello, my name is", "The president of the United States is", "1 2 3 4", "Once upon a time, in a"]


def test_outputs_come_back_in_input_order_with_vllm_fields(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=8)
    outs = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    tok = tiny_llm.get_tokenizer()
    for o, prompt in zip(outs, PROMPTS):
        assert o.prompt_token_ids == tok.encode(prompt)
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 8
        assert c.text == tok.decode(c.token_ids)
    # Each prompt alone gives the same greedy tokens as in the batch.
    for prompt, ids in zip(PROMPTS, token_ids(outs)):
        assert token_ids(tiny_llm.generate(prompt, params, use_tqdm=False))[0] == ids


def test_token_id_prompts_and_dict_prompts(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=5)
    by_text = tiny_llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    by_ids = tiny_llm.generate([tok.encode(PROMPTS[0])], params, use_tqdm=False)[0]
    by_dict = tiny_llm.generate({"prompt_token_ids": tok.encode(PROMPTS[0])}, params, use_tqdm=False)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == by_dict.outputs[0].token_ids


def test_seeded_sampling_reproduces_across_runs_and_batch_compositions(tiny_llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    alone = token_ids(tiny_llm.generate(PROMPTS[1], seeded, use_tqdm=False))[0]
    again = token_ids(tiny_llm.generate(PROMPTS[1], seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=1.0, max_tokens=16), SamplingParams(temperature=0.7, seed=9, max_tokens=7)]
    mixed = tiny_llm.generate(
        [PROMPTS[3], PROMPTS[0], PROMPTS[1], PROMPTS[2]],
        [others[0], others[1], seeded, others[0]],
        use_tqdm=False,
    )
    assert alone == again == mixed[2].outputs[0].token_ids
    different = token_ids(tiny_llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=4321, max_tokens=16), use_tqdm=False))[0]
    assert different != alone  # the seed matters (a 16-token collision is practically impossible)


def test_top_k_1_equals_greedy(tiny_llm):
    greedy = token_ids(tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False))
    top1 = token_ids(tiny_llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=12), use_tqdm=False))
    assert greedy == top1


def test_stop_strings_are_excluded_and_reported(tiny_llm):
    full = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    stop = full.text[10:14]  # a stop string from the middle of the greedy text
    assert stop and full.text.index(stop) >= 1
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == full.text[: full.text.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    kept = tiny_llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(tiny_llm):
    full = tiny_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    first = full.token_ids[0]
    out = tiny_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[first]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [first]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == first
    # With min_tokens the stop token is masked until 5 tokens are out: the output differs and is longer.
    out = tiny_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[first], min_tokens=5), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) >= 5
    assert first not in out.token_ids[:5]


def test_allowed_token_ids_bad_words_and_truncation(tiny_llm):
    """vLLM's allowed_token_ids (every sampled token among them), bad_words (the greedy answer's first
    word banned: it never appears, and the answer changes) and truncate_prompt_tokens (the prompt's
    last k tokens, the same output as giving only those)."""
    tok = tiny_llm.get_tokenizer()
    allowed = tok.encode(" the cat sat on a mat", add_special_tokens=False)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, allowed_token_ids=allowed, ignore_eos=True)
    for out in tiny_llm.generate(PROMPTS, params, use_tqdm=False):
        assert set(out.outputs[0].token_ids) <= set(allowed)

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = tiny_llm.generate(PROMPTS[1], greedy, use_tqdm=False)[0].outputs[0]
    word = tok.decode(plain.token_ids[:1]).strip() or tok.decode(plain.token_ids[1:2]).strip()
    banned = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word])
    out = tiny_llm.generate(PROMPTS[1], banned, use_tqdm=False)[0].outputs[0]
    assert out.token_ids != plain.token_ids
    sequences = tiny_llm.llm_engine._bad_words_token_ids([word])
    assert sequences[0] == tok.encode(word, add_special_tokens=False)
    ids = list(out.token_ids)
    for seq in sequences:  # no banned token sequence anywhere in the answer
        assert all(ids[i : i + len(seq)] != seq for i in range(len(ids))), (word, seq, ids)

    ids = tok.encode(PROMPTS[3])
    cut = SamplingParams(temperature=0, max_tokens=8, truncate_prompt_tokens=4)
    out = tiny_llm.generate({"prompt_token_ids": ids}, cut, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-4:]
    direct = tiny_llm.generate({"prompt_token_ids": ids[-4:]}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out.outputs[0].token_ids == direct[0].outputs[0].token_ids
    whole = SamplingParams(temperature=0, max_tokens=8, truncate_prompt_tokens=-1)  # -1: max_model_len
    assert tiny_llm.generate({"prompt_token_ids": ids}, whole, use_tqdm=False)[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1"):
        SamplingParams(truncate_prompt_tokens=0)


def test_n_returns_n_outputs(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10), use_tqdm=False)
    assert len(out) == 1
    comps = out[0].outputs
    assert [c.index for c in comps] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) > 1


def test_logprobs_shape_and_consistency(tiny_llm):
    out = tiny_llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2), use_tqdm=False
    )[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 6
    total = 0.0
    for tid, lp in zip(c.token_ids, c.logprobs):
        assert tid in lp and lp[tid].rank == 1  # greedy picks the top token
        assert 3 <= len(lp) <= 4
        assert max(x.logprob for x in lp.values()) == lp[tid].logprob
        total += lp[tid].logprob
    assert c.cumulative_logprob == pytest.approx(total)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tid, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tid in lp


def test_impossible_requests_are_rejected_and_nothing_is_queued(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_model_len=32, kv_cache_memory_bytes=16 << 20)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("hello " * 20, SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("hello", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_preemption_recomputes_and_gives_the_same_greedy_output(tiny_llama_dir, tiny_llm):
    prompts = [f"{p} {i}" * (i + 1) for i, p in enumerate(PROMPTS * 2)]
    params = SamplingParams(temperature=0, max_tokens=40)
    expected = token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    # 12 blocks of 16 tokens: the largest request (~110 tokens) fits alone, all 8 together do not.
    small = LLM(tiny_llama_dir, dtype="float32", num_gpu_blocks_override=12)
    got = token_ids(small.generate(prompts, params, use_tqdm=False))
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    assert small.llm_engine.scheduler.kv.num_blocks_in_use() == 0


def test_chunked_prefill_gives_the_same_greedy_output(tiny_llama_dir, tiny_llm):
    prompts = ["word " * 60, "short", "another longer prompt " * 10]
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    chunked = LLM(tiny_llama_dir, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=16 << 20)
    assert token_ids(chunked.generate(prompts, params, use_tqdm=False)) == expected


def test_short_steps_while_decoding_give_the_same_greedy_output(tiny_llama_dir, tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["word " * 40, "another longer prompt " * 8, "short one"]
    expected = token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    offline = LLM(tiny_llama_dir, dtype="float32", max_num_batched_tokens=32, kv_cache_memory_bytes=16 << 20)
    assert offline.llm_engine.scheduler.config.max_num_batched_tokens_while_decoding == 32  # offline: all of it
    assert not offline.llm_engine.config.cache.prefault_in_background  # offline steps start at once
    del offline
    engine = LLMEngine.from_engine_args(
        EngineArgs(tiny_llama_dir, dtype="float32", max_num_batched_tokens=32, kv_cache_memory_bytes=16 << 20, serving=True)
    )
    assert engine.scheduler.config.max_num_batched_tokens_while_decoding == 8  # a server on a CPU: a quarter
    assert engine.config.cache.prefault_in_background  # and its KV pages are faulted in while it waits
    schedule, sizes = engine.scheduler.schedule, []  # tokens of each step

    def recording_schedule():
        out = schedule()
        sizes.append(out.total_num_scheduled_tokens)
        return out

    engine.scheduler.schedule = recording_schedule
    engine.add_request("0", prompts[0], params)
    got = {}
    while engine.has_unfinished_requests():
        if len(sizes) == 3:  # the others join while the first decodes
            engine.add_request("1", prompts[1], params)
            engine.add_request("2", prompts[2], params)
        got.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    assert [got[str(i)] for i in range(3)] == expected
    assert sizes[0] > 8 and max(sizes[3:]) == 8  # the first prompt alone got the full budget
    with pytest.raises(ValueError, match="max_num_batched_tokens_while_decoding"):
        LLM(tiny_llama_dir, dtype="float32", max_num_batched_tokens_while_decoding=0)


def test_abort_frees_blocks(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("to-abort", "Hello there", SamplingParams(max_tokens=50))
    engine.add_request("to-keep", "Hello again", SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert engine.scheduler.kv.num_blocks_in_use() > 0
    aborted = engine.abort_request("to-abort")
    assert aborted and aborted[0].outputs[0].finish_reason == "abort"
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["to-keep"]
    assert engine.scheduler.kv.num_blocks_in_use() == 0


def test_prefix_cache_hits_are_reported(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", kv_cache_memory_bytes=16 << 20)
    doc = "A long shared system prompt about many things. " * 8
    params = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate(doc + "Question one?", params, use_tqdm=False)[0]
    second = llm.generate(doc + "Question two?", params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 64 and second.num_cached_tokens % 16 == 0
    stats = llm.llm_engine.scheduler.kv.stats
    assert stats.hits == second.num_cached_tokens and stats.requests == 2


def test_garbage_in_fresh_kv_memory_never_reaches_outputs(tiny_llama_dir):
    """The KV cache is allocated uninitialised; NaN there must not leak through masked block tails.
    Two fresh engines with the same settings run the same schedule on the same block ids; only
    the cache's initial contents differ (zeros / NaN), so their outputs must be identical."""
    prompts = PROMPTS[:3]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    outputs = []
    for fill in (0.0, float("nan")):
        llm = LLM(tiny_llama_dir, dtype="float32", kv_cache_memory_bytes=16 << 20)
        for cache in llm.llm_engine.runner.kv_caches:
            cache.fill_(fill)
        outputs.append(llm.generate(prompts, params, use_tqdm=False))
    expected, got = outputs
    assert token_ids(got) == token_ids(expected)
    for g, e in zip(got, expected):
        assert g.outputs[0].cumulative_logprob == e.outputs[0].cumulative_logprob
        assert g.outputs[0].logprobs == e.outputs[0].logprobs


def test_vllm_prompt_types(tiny_llm):
    from kvserve import TextPrompt, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=4)
    ids = tiny_llm.get_tokenizer().encode(PROMPTS[0])
    a = tiny_llm.generate(TextPrompt(prompt=PROMPTS[0]), params, use_tqdm=False)[0]
    b = tiny_llm.generate(TokensPrompt(prompt_token_ids=ids, prompt="shown"), params, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert b.prompt == "shown" and b.prompt_token_ids == ids
