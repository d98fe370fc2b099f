"""The default model (SmolLM2-135M-Instruct) behind `kvserve serve`, driven by the official `openai`
client: completions and chat, streaming or not, n > 1, logprobs, stop, seeds, usage; TGI's routes over
plain HTTP; and greedy text equal to the offline `LLM.generate` / `LLM.chat`."""
from __future__ import annotations

import json

import httpx
import pytest

from kvserve import SamplingParams

from .conftest import DEFAULT_ENGINE, DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
ENGINE = DEFAULT_ENGINE
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def client(default_client):
    return default_client


@pytest.fixture(scope="module")
def offline_llm(server):  # after the server, so that the two loads do not overlap
    from kvserve import LLM

    return LLM(**ENGINE)


def test_health_was_503_while_the_model_loaded(server):
    assert server.saw_503_while_loading
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert "Ready: model loaded" in server.log()


def test_models_and_version(client, server):
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "kvserve"
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_greedy_completion_equals_llm_generate(client, offline_llm):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    [expected] = offline_llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    assert out.choices[0].text == expected.outputs[0].text
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_greedy_chat_equals_llm_chat(client, offline_llm):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24, temperature=0)
    [expected] = offline_llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_llm_chat_passes_tools_to_the_template(offline_llm):
    template = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(max_tokens=1, temperature=0)
    [with_tools] = offline_llm.chat(conversation, params, use_tqdm=False, chat_template=template, tools=tools)
    [without] = offline_llm.chat(conversation, params, use_tqdm=False, chat_template=template)
    tokenizer = offline_llm.get_tokenizer()
    assert with_tools.prompt_token_ids == tokenizer.encode("[get_weather]Weather in Paris?", add_special_tokens=False)
    assert without.prompt_token_ids == tokenizer.encode("Weather in Paris?", add_special_tokens=False)


def test_streamed_completion_equals_the_whole_one_and_reports_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_sends_role_first_then_content(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats: each chunk's usage counts the tokens sent so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options=options, extra_body={"ignore_eos": True}))  # fmt: skip
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8 and counts[0] >= 1
    assert all(c.usage.prompt_tokens == chunks[0].usage.prompt_tokens > 0 for c in chunks)
    chat = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                               stream_options=options, extra_body={"ignore_eos": True}))  # fmt: skip
    counts = [c.usage.completion_tokens for c in chat]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 6  # the role chunk comes first


def test_n_choices(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert len({c.text for c in out.choices}) > 1  # sampled independently
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=7)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    stream = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=4, n=2,
                                       temperature=1.0, stream=True)  # fmt: skip
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1, 2, 3}  # prompt i, choice j -> index i * n + j


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert echoed.choices[0].text.startswith(PROMPT)
    assert echoed.choices[0].logprobs.token_logprobs[0] is None  # nothing predicts the first prompt token


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy
        assert bytes(t.bytes).decode() == t.token


def test_stop_string(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    words = free.split()
    stop = words[len(words) // 2]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == free[: free.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed)

    assert sample(1234).choices[0].text == sample(1234).choices[0].text
    assert len({sample(s).choices[0].text for s in (1, 2, 3)}) > 1


def test_vllm_extras_pass_through(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True, "min_tokens": 10, "top_k": 5})  # fmt: skip
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"


def test_tgi_generate_matches_openai_greedy(client, server):
    expected = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    out = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert out["generated_text"] == expected
    details = out["details"]
    assert details["generated_tokens"] == len(details["tokens"]) and details["finish_reason"] in ("length", "eos_token")
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    full_text = {**body, "parameters": {"max_new_tokens": 12, "return_full_text": True}}
    full = httpx.post(f"{server.url}/generate", json=full_text, timeout=60).json()
    assert full["generated_text"] == PROMPT + expected


def test_tgi_generate_stream_token_events(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["generated_tokens"] == len(events)
    whole = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert last["generated_text"] == whole["generated_text"]
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] == ENGINE["max_model_len"]


def test_tokenize_detokenize_round_trip(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == ENGINE["max_model_len"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == PROMPT
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > ids["count"]


def test_vllm_token_controls_through_extra_body(client, offline_llm):
    """vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens, as its clients send them (extra_body):
    the answer uses only allowed tokens, avoids the bad word, and the usage counts the truncated prompt;
    each equal to LLM.generate with the same SamplingParams."""
    tok = offline_llm.get_tokenizer()
    allowed = tok.encode(" Paris is a city in France and Europe .", add_special_tokens=False)
    extra = {"allowed_token_ids": allowed, "truncate_prompt_tokens": 3, "bad_words": ["France"]}
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    ids = offline_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, **extra), use_tqdm=False
    )[0].outputs[0].token_ids
    assert set(ids) <= set(allowed) and "France" not in out.choices[0].text
    assert out.choices[0].text == tok.decode(ids)
    assert out.usage.prompt_tokens == 3
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
    assert chat.usage.prompt_tokens == 5
