"""Structured output without a model: StructuredOutputsParams, the scheduler with fake grammars (waiting
for a compile, finishing, preemption), the request fields the server merges, xgrammar's bitmask kernel
against the torch reference, and compiling with the default model's tokenizer."""
import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from kvserve.core.request import RequestStatus
from kvserve.entrypoints.openai.structured_outputs import (
    ResponseFormat,
    StructuredOutputsRequest,
    structured_outputs_params,
)
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams

from test_scheduler import make_request, make_scheduler, step  # tests/unit is on sys.path

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


class Color(BaseModel):
    color: Literal["red", "green"]


# --- StructuredOutputsParams ------------------------------------------------------------------------


def test_params_take_exactly_one_constraint():
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    one_of = "exactly one of json, regex, choice, grammar, json_object, structural_tag; got none"
    with pytest.raises(ValueError, match=one_of):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got json, regex"):
        StructuredOutputsParams(json=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="non-empty strings"):
        StructuredOutputsParams(choice=[])


def test_json_may_be_a_dict_a_string_or_a_pydantic_model_and_keys_say_when_grammars_are_equal():
    as_dict = StructuredOutputsParams(json=SCHEMA)
    assert StructuredOutputsParams(json=json.dumps(SCHEMA)).json == json.dumps(SCHEMA)
    assert StructuredOutputsParams(json=Color).json == Color.model_json_schema()
    reordered = StructuredOutputsParams(json=dict(reversed(list(SCHEMA.items()))))
    assert as_dict.key() == reordered.key()
    assert as_dict.key() != StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True).key()
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert params.structured_outputs.kind == "choice"
    assert params.clone().structured_outputs.key() == ("choice", ("a", "b"), False, False)


# --- the request fields the server merges -----------------------------------------------------------


def test_request_fields_merge_into_one_constraint_and_several_are_named():
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    schema_format = ResponseFormat.model_validate(json_schema)
    assert structured_outputs_params(schema_format, None, {}).json == SCHEMA
    assert structured_outputs_params(ResponseFormat(type="text"), None, {"guided_json": None}) is None
    assert structured_outputs_params(None, None, {"guided_choice": ["a"]}).choice == ["a"]
    so = StructuredOutputsRequest.model_validate({"grammar": 'root ::= "a"', "disable_any_whitespace": True})
    assert structured_outputs_params(None, so, {}).disable_any_whitespace
    with pytest.raises(ValueError, match="sets 2: structured_outputs.json, structured_outputs.regex"):
        structured_outputs_params(None, StructuredOutputsRequest.model_validate({"json": SCHEMA, "regex": "a"}), {})
    with pytest.raises(ValueError, match="sets 2: guided_regex, response_format"):
        structured_outputs_params(ResponseFormat(type="json_object"), None, {"guided_regex": "a"})
    with pytest.raises(ValueError, match="it sets none"):
        structured_outputs_params(None, StructuredOutputsRequest(), {})


# --- the scheduler with fake grammars (no torch, no xgrammar) ---------------------------------------


class FakeGrammar:
    """Accepts any token but `reject`; complete after accepting `end`."""

    def __init__(self, ready=True, end=99, reject=-1):
        self.ready, self.end, self.reject, self.accepted = ready, end, reject, []

    def is_ready(self):
        return self.ready

    def accept(self, token_id):
        if token_id == self.reject:
            return False
        self.accepted.append(token_id)
        return True

    def is_terminated(self):
        return bool(self.accepted) and self.accepted[-1] == self.end


def with_grammar(request, grammar):
    request.grammar = grammar
    return request


def test_a_request_waits_for_its_grammar_while_the_others_run():
    s = make_scheduler()
    compiling = FakeGrammar(ready=False)
    s.add_request(with_grammar(make_request("g", 5), compiling))
    s.add_request(make_request("plain", 5, start=50))
    out, _ = step(s)
    assert list(out.num_scheduled_tokens) == ["plain"] and out.grammar_req_ids == []
    assert [r.request_id for r in s.waiting] == ["g"]
    compiling.ready = True
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"plain": 1, "g": 5}
    assert out.grammar_req_ids == ["g"]  # it samples this step, under its grammar
    assert compiling.accepted == [7]


def test_grammar_rows_are_only_those_that_sample():
    s = make_scheduler(budget=4)
    s.add_request(with_grammar(make_request("g", 10), FakeGrammar()))
    out, _ = step(s)  # a chunk of the prompt: nothing is sampled
    assert out.num_scheduled_tokens == {"g": 4} and out.grammar_req_ids == []


def test_a_complete_grammar_stops_the_request_and_a_rejected_token_aborts_it():
    s = make_scheduler()
    done, bad = FakeGrammar(end=7), FakeGrammar(reject=7)
    s.add_request(with_grammar(make_request("done", 3, max_tokens=10, ignore_eos=True), done))
    s.add_request(with_grammar(make_request("bad", 3, start=40), bad))
    _, updates = step(s)
    assert {u.req_id: u.finish_reason for u in updates} == {"done": "stop", "bad": "abort"}
    assert done.accepted == [7] and not s.has_unfinished_requests()


def test_max_tokens_mid_grammar_is_length():
    s = make_scheduler()
    grammar = FakeGrammar()
    s.add_request(with_grammar(make_request("g", 3, max_tokens=2), grammar))
    step(s)
    _, [update] = step(s)
    assert update.finish_reason == "length"


def test_a_preempted_request_keeps_its_grammar_state_and_is_never_refed():
    s = make_scheduler(num_blocks=6, max_len=64)
    grammars = {rid: FakeGrammar() for rid in ("a", "b")}
    s.add_request(with_grammar(make_request("a", 8, max_tokens=12), grammars["a"]))
    s.add_request(with_grammar(make_request("b", 8, max_tokens=12, start=40), grammars["b"]))
    while s.has_unfinished_requests():
        step(s)
    assert s.num_preemptions > 0
    # Each grammar accepted each output token once (the 12th ends the request by length, unfed).
    assert grammars["a"].accepted == [7] * 11 and grammars["b"].accepted == [7] * 11


# --- the bitmask: the CPU path against the torch reference and xgrammar's own kernel ----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_matches_the_reference_and_xgrammar_and_leaves_other_rows_alone(dtype):
    from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

    from kvserve.worker.grammar_mask import apply_grammar_bitmask, apply_grammar_bitmask_reference

    g = torch.Generator().manual_seed(0)
    vocab, rows = 1000, [3, 0, 4]
    logits = torch.randn(5, vocab, generator=g).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), generator=g, dtype=torch.int32)
    bitmask[1] = 0
    bitmask[1, 2] = 1 << 7  # one token allowed: 71
    bitmask[2] = -1  # every token allowed
    fast, ref, xgr = logits.clone(), logits.clone(), logits.clone()
    apply_grammar_bitmask(fast, bitmask, rows)
    apply_grammar_bitmask_reference(ref, bitmask, rows)
    full = torch.full((5, bitmask.shape[1]), -1, dtype=torch.int32)
    full[rows] = bitmask
    apply_token_bitmask_inplace_cpu(xgr, full, vocab, rows)
    assert torch.equal(fast, ref) and torch.equal(fast, xgr)
    assert torch.equal(fast[[1, 2, 4]], logits[[1, 2, 4]])  # rows without a grammar, or allowing all: untouched
    assert torch.isfinite(fast[0]).nonzero().flatten().tolist() == [71]
    token = 37  # word 1, bit 5
    assert torch.isinf(fast[3, token]).item() != bool((int(bitmask[0, 1]) >> 5) & 1)


# --- compiling with the default model's tokenizer ---------------------------------------------------


@pytest.fixture(scope="module")
def manager():
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.model.config_loader import default_model_path
    from kvserve.structured_output import StructuredOutputManager

    tokenizer = load_tokenizer(default_model_path())
    return StructuredOutputManager(tokenizer, len(tokenizer), tokenizer.eos_token_ids), tokenizer


def accepts(manager_and_tokenizer, params, text) -> bool:
    manager, tokenizer = manager_and_tokenizer
    matcher = manager.backend().new_matcher(manager.compile(params))
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and (
        matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()
    )


def test_each_kind_compiles_once_and_matches_what_it_should(manager):
    mgr, _ = manager
    params = StructuredOutputsParams(choice=['say "hi"', "back\\slash", "two\nlines"])
    assert mgr.submit(params) is mgr.submit(StructuredOutputsParams(choice=list(params.choice)))  # cached
    for choice in params.choice:
        assert accepts(manager, params, choice)
    assert not accepts(manager, params, "say hi")
    assert accepts(manager, StructuredOutputsParams(regex=r"\d{3}-\d{4}"), "123-4567")
    assert not accepts(manager, StructuredOutputsParams(regex=r"\d{3}-\d{4}"), "12-4567")
    assert accepts(manager, StructuredOutputsParams(grammar='root ::= "cat" | "dog" [0-9]+'), "dog42")
    assert accepts(manager, StructuredOutputsParams(json=SCHEMA), '{ "ok" :\n true}')
    assert not accepts(manager, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), '{ "ok" :\n true}')
    assert accepts(manager, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), '{"ok": true}')
    assert accepts(manager, StructuredOutputsParams(json_object=True), '{"any": [1, 2]}')
    assert not accepts(manager, StructuredOutputsParams(json_object=True), "[1, 2]")
    loose = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}
    assert accepts(manager, StructuredOutputsParams(json=loose), '{"a": 1, "b": 2}')
    closed = StructuredOutputsParams(json=loose, disable_additional_properties=True)
    assert not accepts(manager, closed, '{"a": 1, "b": 2}')


def test_strict_hermes_tag_lets_text_be_and_holds_calls_to_the_schema(manager):
    """The structural tag tool_choice "auto" makes for strict tools under the hermes parser."""
    from kvserve.entrypoints.openai.tool_choice import ChatCompletionTool, hermes_structural_tag

    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}  # fmt: skip
    tools = [ChatCompletionTool(function={"name": "get_weather", "parameters": weather, "strict": True})]
    params = StructuredOutputsParams(structural_tag=hermes_structural_tag(tools))
    assert accepts(manager, params, "It is sunny, no call needed.")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert accepts(manager, params, "Let me check.\n" + call)
    assert not accepts(manager, params, call.replace('"city"', '"town"'))  # not the schema
    assert not accepts(manager, params, call.replace("get_weather", "get_time"))  # not a tool


def test_a_constraint_that_does_not_compile_raises_the_compilers_message(manager):
    mgr, _ = manager
    bad = StructuredOutputsParams(json={"type": "foo"})
    with pytest.raises(ValueError, match=r'^structured_outputs.json does not compile: Unsupported type "foo"$'):
        mgr.compile(bad)
    with pytest.raises(ValueError, match="does not compile"):  # known bad: raised before any request is queued
        mgr.request_grammar(bad)
    with pytest.raises(ValueError, match=r"structured_outputs.grammar does not compile: .*not defined"):
        mgr.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))
