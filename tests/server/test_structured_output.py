"""Structured output on the default model behind `kvserve serve`: the official `openai` client's
`parse(response_format=<pydantic model>)` (greedy, and 20 seeds sampled: every answer validates), a regex,
a choice and a GBNF grammar through vLLM's request fields, streaming assembled from deltas, the 400s;
TGI's `grammar` through Hugging Face's `text_generation` client on TGI's root route; and the offline
`LLM.generate` with the same constraints giving the server's greedy answers."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import text_generation
from pydantic import BaseModel, Field
from text_generation.types import Grammar

from kvserve import SamplingParams
from kvserve.sampling_params import StructuredOutputsParams

from .conftest import DEFAULT_ENGINE, DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
ASK = [{"role": "user", "content": "Report today's weather in Paris as JSON."}]
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
YES_NO = 'root ::= answer "." \nanswer ::= "Yes" | "No"'
# A Weather answer takes 20-45 tokens; the margin covers runs of whitespace, which JSON allows anywhere.
MAX_JSON_TOKENS = 160


class Weather(BaseModel):
    city: str = Field(max_length=24)
    temperature_c: int = Field(ge=-50, le=50)
    sunny: bool



def chat(client, messages=ASK, **kwargs):
    kwargs.setdefault("max_completion_tokens", MAX_JSON_TOKENS)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def complete(client, **kwargs):
    return client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, **kwargs)


def test_parse_into_a_pydantic_model_greedy_and_with_20_seeds(default_client):
    def parse(**kwargs):
        return default_client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Weather, max_completion_tokens=MAX_JSON_TOKENS, **kwargs
        )

    greedy = parse(temperature=0)
    assert isinstance(greedy.choices[0].message.parsed, Weather) and greedy.choices[0].finish_reason == "stop"
    sampled = parse(temperature=1.0, seed=0, n=20)  # one request: 20 choices, seeds 0..19, in one batch
    assert len(sampled.choices) == 20
    for choice in sampled.choices:
        assert isinstance(choice.message.parsed, Weather), choice.message.content
    assert len({c.message.content for c in sampled.choices}) > 1


def test_regex_choice_grammar_and_json_object(default_client):
    phone = complete(default_client, temperature=0, extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, phone.choices[0].text) and phone.choices[0].finish_reason == "stop"
    sky = [{"role": "user", "content": "Is the sky blue?"}]
    choice = chat(default_client, sky, extra_body={"guided_choice": ["blue", "green", "it depends"]})
    assert choice.choices[0].message.content in ["blue", "green", "it depends"]
    paris = [{"role": "user", "content": "Is Paris in France?"}]
    grammar = chat(default_client, paris, temperature=0, extra_body={"structured_outputs": {"grammar": YES_NO}})
    assert grammar.choices[0].message.content in ("Yes.", "No.")
    obj = chat(default_client, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_structural_tag_as_response_format_and_in_structured_outputs(default_client):
    """vLLM's response_format {"type": "structural_tag", "structures", "triggers"} and its
    structured_outputs.structural_tag: free text until "<" (a logit bias makes the model write it),
    then "<weather>", a Weather object, "</weather>"; every tagged part parses."""
    lt = str(default_tokenizer().encode("<", add_special_tokens=False)[0])
    structures = [{"begin": "<weather>", "schema": Weather.model_json_schema(), "end": "</weather>"}]
    tag = {"structures": structures, "triggers": ["<"]}
    answers = [
        chat(default_client, temperature=0, logit_bias={lt: 40}, response_format={"type": "structural_tag", **tag}),
        chat(default_client, temperature=0, logit_bias={lt: 40},
             extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}}),
    ]  # fmt: skip
    for answer in answers:
        text = answer.choices[0].message.content
        parts = re.findall(r"<weather>(.*?)</weather>", text, flags=re.S)
        assert text.startswith("<weather>") and parts, text
        for part in parts:
            Weather.model_validate_json(part)
    with pytest.raises(openai.BadRequestError, match="structural_tag needs structures"):
        chat(default_client, response_format={"type": "structural_tag"})


def default_tokenizer():
    """The default model's tokenizer, as the server has it."""
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.model.config_loader import default_model_path

    return load_tokenizer(str(default_model_path()))


def test_streamed_answers_assembled_from_deltas_follow_the_constraint(default_client):
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": Weather.model_json_schema()}}
    chunks = chat(default_client, temperature=0, response_format=schema, stream=True)
    Weather.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    chunks = list(complete(default_client, temperature=0.8, seed=3, stream=True, extra_body={"guided_regex": PHONE}))
    assert re.fullmatch(PHONE, "".join(c.choices[0].text for c in chunks)), chunks
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_schema_that_does_not_compile_and_two_constraints_are_400s(default_client):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(default_client, extra_body={"structured_outputs": {"json": {"type": "no-such-type"}}})
    assert bad.value.status_code == 400
    assert bad.value.body["message"] == 'structured_outputs.json does not compile: Unsupported type "no-such-type"'
    for stream in (False, True):  # never a 200 stream carrying the error
        with pytest.raises(openai.BadRequestError) as two:
            complete(default_client, stream=stream, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
        assert "structured_outputs.regex, structured_outputs.choice" in two.value.body["message"]
        assert two.value.body["param"] == "structured_outputs"
    with pytest.raises(openai.BadRequestError, match="guided_regex, response_format"):
        chat(default_client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})


def test_tgi_grammar_through_the_text_generation_client_on_the_root_route(default_server):
    url = default_server.url
    tgi = text_generation.Client(url, timeout=60)  # posts to the base URL, as to TGI's router
    regex = Grammar(type="regex", value=PHONE)
    phone = tgi.generate("Call me at", max_new_tokens=20, grammar=regex)
    assert re.fullmatch(PHONE, phone.generated_text) and phone.details.finish_reason == "eos_token"
    weather = Grammar(type="json", value=Weather.model_json_schema())
    answer = tgi.generate("Paris weather as JSON:", max_new_tokens=MAX_JSON_TOKENS, grammar=weather)
    Weather.model_validate_json(answer.generated_text)
    events = list(tgi.generate_stream("Call me at", max_new_tokens=20, grammar=regex))
    assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text
    assert events[-1].generated_text == phone.generated_text and events[-1].details.finish_reason == "eos_token"
    # The root route answers a non-streamed request with a one-element list; errors in TGI's shape.
    body = {"inputs": "Call me at", "parameters": {"max_new_tokens": 20, "grammar": {"type": "regex", "value": PHONE}}}
    [root] = httpx.post(url, json=body, timeout=60).json()
    assert root["generated_text"] == "Call me at" + phone.generated_text  # return_full_text defaults to true at /
    assert httpx.post(f"{url}/generate", json=body, timeout=60).json()["generated_text"] == phone.generated_text
    body["parameters"]["grammar"] = {"type": "json", "value": {"type": "no-such-type"}}
    bad = httpx.post(url, json=body, timeout=60)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    assert "Unsupported type" in bad.json()["error"]


def test_offline_generate_gives_the_servers_answers(default_client):
    from kvserve import LLM

    llm = LLM(**DEFAULT_ENGINE)  # after the server is up, so that the two loads do not overlap
    served = complete(default_client, temperature=0, extra_body={"structured_outputs": {"regex": PHONE}})
    cases = [
        (StructuredOutputsParams(regex=PHONE), lambda text: text == served.choices[0].text),
        (StructuredOutputsParams(json=Weather), lambda text: Weather.model_validate_json(text)),
        (StructuredOutputsParams(choice=["blue", "green"]), lambda text: text in ("blue", "green")),
        (StructuredOutputsParams(grammar=YES_NO), lambda text: text in ("Yes.", "No.")),
        (StructuredOutputsParams(json_object=True), lambda text: isinstance(json.loads(text), dict)),
    ]
    params = [SamplingParams(temperature=0, max_tokens=MAX_JSON_TOKENS, structured_outputs=c) for c, _ in cases]
    ask = llm.get_tokenizer().apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    outputs = llm.generate(["Call me at"] + [ask] * (len(cases) - 1), params, use_tqdm=False)
    for (_, check), out in zip(cases, outputs):
        assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), out.outputs[0].text
