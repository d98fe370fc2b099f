"""Structured output through the engine on the tiny random model: whatever the (random) model prefers,
every answer follows its constraint. Unconstrained neighbours are untouched, preemption and prefix
caching keep constrained answers the same, logprobs see the masked distribution, and a request whose
grammar compiles waits alone."""
import re
import threading
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from kvserve import LLM, SamplingParams
from kvserve.sampling_params import StructuredOutputsParams as S


class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
    n: int = Field(ge=0, le=9)


PICK = S(json=Pick, disable_any_whitespace=True)  # bounded length: no free-form strings or whitespace
CHOICES = ["alpha", "beta gamma", 'say "hi"']


def fullmatch(pattern):
    def check(text):
        assert re.fullmatch(pattern, text), text

    return check


def one_of(choices):
    def check(text):
        assert text in choices, text

    return check


CONSTRAINTS = {  # kind: (constraint, check of an answer)
    "json": (PICK, Pick.model_validate_json),
    "regex": (S(regex=r"[a-c]{2}-\d{3}"), fullmatch(r"[a-c]{2}-\d{3}")),
    "choice": (S(choice=CHOICES), one_of(CHOICES)),
    "grammar": (S(grammar='root ::= "x" [0-9] ("," "x" [0-9])?'), fullmatch(r"x\d(,x\d)?")),
}
PROMPTS = ["The answer is", "hello world", "Once upon a time, in a land far away"]


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_every_answer_follows_its_constraint_greedy_and_sampled(tiny_llm, kind):
    constraint, check = CONSTRAINTS[kind]
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=constraint)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=48, structured_outputs=constraint) for s in range(4)]
    outputs = tiny_llm.generate([p for p in PROMPTS for _ in params], params * len(PROMPTS), use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (kind, completion.text)
        check(completion.text)


def test_json_object_starts_an_object(tiny_llm):
    # The random model writes endless strings inside it; the default model's tests see it end.
    params = SamplingParams(temperature=0, max_tokens=16, structured_outputs=S(json_object=True))
    [out] = tiny_llm.generate("hello", params, use_tqdm=False)
    assert out.outputs[0].text.startswith("{")


@pytest.mark.parametrize("form", ["vllm", "xgrammar"])
def test_structural_tag_constrains_only_what_follows_its_trigger(tiny_llm, form):
    """A structural tag (vLLM's structures + triggers, or xgrammar's format): text is free until the
    trigger "<" (pushed by a logit bias so that the random model writes it), then "<pick>", a JSON
    object of Pick's schema and "</pick>". Every tagged part validates; without the tag the same
    bias writes "<" after "<". (Whitespace bounded, by disable_any_whitespace or the format's own
    max_whitespace_cnt: the random model would fill the JSON with it.)"""
    schema = Pick.model_json_schema()
    if form == "vllm":
        tag = {"structures": [{"begin": "<pick>", "schema": schema, "end": "</pick>"}], "triggers": ["<"]}
    else:
        content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<"], "tags": [
            {"type": "tag", "begin": "<pick>", "content": content, "end": "</pick>"}]}}  # fmt: skip
    lt = tiny_llm.get_tokenizer().encode("<", add_special_tokens=False)[0]
    params = SamplingParams(temperature=0, max_tokens=64, logit_bias={lt: 40.0}, ignore_eos=True)
    free = tiny_llm.generate("hello", params, use_tqdm=False)[0].outputs[0].text
    assert free.startswith("<<")
    params.structured_outputs = S(structural_tag=tag, disable_any_whitespace=form == "vllm")
    text = tiny_llm.generate("hello", params, use_tqdm=False)[0].outputs[0].text
    parts = re.findall(r"<pick>(.*?)</pick>", text, flags=re.S)
    assert text.startswith("<pick>") and len(parts) >= 1, text
    for part in parts:
        Pick.model_validate_json(part)


def test_structural_tag_errors_name_the_field():
    with pytest.raises(ValueError, match="structural_tag is not valid JSON"):
        S(structural_tag="{")
    with pytest.raises(ValueError, match="structural_tag must be an object with `structures`"):
        S(structural_tag={"begin": "<a>"})


def test_unconstrained_neighbours_get_the_same_tokens(tiny_llm):
    plain = SamplingParams(temperature=0, max_tokens=12)
    alone = tiny_llm.generate(PROMPTS, plain, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=12, structured_outputs=CONSTRAINTS["regex"][0])
    mixed = tiny_llm.generate(PROMPTS * 2, [plain] * 3 + [constrained] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]


def test_max_tokens_mid_json_is_length_and_n_children_each_follow(tiny_llm):
    cut_short = SamplingParams(temperature=0, max_tokens=3, structured_outputs=PICK)
    [cut] = tiny_llm.generate("x", cut_short, use_tqdm=False)
    assert cut.outputs[0].finish_reason == "length" and cut.outputs[0].text.startswith('{"')
    three = SamplingParams(n=3, seed=1, max_tokens=48, structured_outputs=PICK)
    [fanned] = tiny_llm.generate("x", three, use_tqdm=False)
    for completion in fanned.outputs:
        Pick.model_validate_json(completion.text)


def test_preemption_and_prefix_caching_keep_constrained_answers(tiny_llama_dir, tiny_llm):
    prompts = [f"{p} {i}" * (i + 1) for i, p in enumerate(PROMPTS * 2)]
    long = S(regex="[a-z]{60}")  # answers long enough to outgrow the small cache below
    params = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=c) for c in (PICK, long, long)] * 2
    expected = texts(tiny_llm.generate(prompts, params, use_tqdm=False))
    assert all(re.fullmatch("[a-z]{60}", text) for text in expected[1:3] + expected[4:])
    assert texts(tiny_llm.generate(prompts, params, use_tqdm=False)) == expected  # prompts now prefix-cache hits
    small = LLM(tiny_llama_dir, dtype="float32", num_gpu_blocks_override=10)
    assert texts(small.generate(prompts, params, use_tqdm=False)) == expected
    assert small.llm_engine.scheduler.num_preemptions > 0


def test_logprobs_see_the_masked_distribution(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=3, structured_outputs=S(choice=["a", "b"]))
    [out] = tiny_llm.generate("hello", params, use_tqdm=False)
    [entry] = out.outputs[0].logprobs
    tokenizer = tiny_llm.get_tokenizer()
    allowed = {tokenizer.encode(c, add_special_tokens=False)[0] for c in ("a", "b")}
    finite = {t: lp.logprob for t, lp in entry.items() if lp.logprob > float("-inf")}
    assert set(finite) == allowed  # everything else was masked before the logprobs were taken
    assert sum(2.718281828459045**lp for lp in finite.values()) == pytest.approx(1.0, abs=1e-4)


def test_a_request_waits_for_its_grammar_and_the_batch_does_not(tiny_llm):
    engine = tiny_llm.llm_engine
    manager = engine.structured_output
    release = threading.Event()
    original = manager._compile

    def slow_compile(params):
        release.wait(30)
        return original(params)

    manager._compile = slow_compile
    try:
        slow = S(regex=r"slow[0-9]")
        engine.add_request("constrained", "hello", SamplingParams(temperature=0, max_tokens=8, structured_outputs=slow))
        engine.add_request("plain", "hello", SamplingParams(temperature=0, max_tokens=4))
        finished = {}
        for _ in range(4):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert "plain" in finished and "constrained" not in finished
        assert [r.request_id for r in engine.scheduler.waiting] == ["constrained"]
        release.set()
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert re.fullmatch(r"slow[0-9]", finished["constrained"].outputs[0].text)
        assert not engine._compiling
    finally:
        manager._compile = original
        release.set()


def test_a_grammar_that_fails_to_compile(tiny_llm):
    bad = S(json={"type": "no-such-type"})
    with pytest.raises(ValueError, match="does not compile: Unsupported type"):  # offline: before anything runs
        tiny_llm.generate("hello", SamplingParams(structured_outputs=bad), use_tqdm=False)
    engine = tiny_llm.llm_engine
    with pytest.raises(ValueError, match="does not compile"):  # the engine knows it now: nothing is queued
        engine.add_request("bad", "hello", SamplingParams(structured_outputs=bad))
    assert not engine.has_unfinished_requests()


def test_a_grammar_that_fails_while_its_request_waits_aborts_only_that_request(tiny_llm):
    engine = tiny_llm.llm_engine
    manager = engine.structured_output
    original = manager._compile
    release = threading.Event()

    def failing_compile(params):
        release.wait(30)
        raise ValueError("structured_outputs.regex does not compile: test")

    manager._compile = failing_compile
    try:
        engine.add_request("doomed", "hello", SamplingParams(max_tokens=4, structured_outputs=S(regex="doomed")))
        engine.add_request("fine", "hello", SamplingParams(temperature=0, max_tokens=4))
        release.set()
        finished = {}
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert finished["doomed"].outputs[0].finish_reason == "abort"
        assert finished["fine"].outputs[0].finish_reason == "length"
        assert not engine._compiling and engine.get_num_unfinished_requests() == 0
    finally:
        manager._compile = original
        release.set()
