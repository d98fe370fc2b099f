"""Bad requests get 400 (404 for an unknown model) in OpenAI's error shape, with a message saying what to
change, and never reach the engine; TGI's routes answer in TGI's error shape."""
from __future__ import annotations

import httpx
import pytest

MAX_MODEL_LEN = 512  # the tiny model's max_position_embeddings
CHAT = [{"role": "user", "content": "Hi"}]

# (route, body, status, param, words the message must contain)
CASES = [
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature", ["temperature", "non-negative"]),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", ["top_p", "(0, 1]"]),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p", ["top_p", "(0, 1]"]),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n", ["n must be at least 1"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens", "at least 1"]),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs", ["logprobs", "at most 20"]),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", ["temperature", "number"]),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", ["prompt", "expected"]),
    ("/v1/completions", {"prompt": "Hi", "stream": [1]}, 400, "stream", ["stream", "boolean"]),
    ("/v1/completions", {}, 400, "prompt", ["prompt", "Field required"]),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", ["prompt is empty"]),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ["prompt is empty"]),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", ["token ids must be in"]),
    ("/v1/completions", {"prompt": "Hi", "temprature": 0}, 400, "temprature", ["Unrecognized", "temprature"]),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, 400, "stop", ["stop", "empty"]),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", ["token ids"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens",
     ["max_model_len", "lower max_tokens"]),
    ("/v1/completions", {"prompt": "word " * MAX_MODEL_LEN, "max_tokens": None}, 400, "prompt",
     ["Shorten the prompt"]),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-17"}, 404, "model", ["gpt-17", "does not exist"]),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ["messages", "at least 1"]),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages", ["messages", "list"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role",
     ["'system', 'user', 'assistant' or 'tool'"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", ["logprobs: true"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN}, 400, "max_tokens",
     ["max_model_len"]),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": 3}, 400, "frequency_penalty", ["[-2, 2]"]),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model", ["nope"]),
    ("/v1/completions", {"prompt": "Hi", "allowed_token_ids": [10**9]}, 400, "allowed_token_ids",
     ["allowed_token_ids must be in"]),
    ("/v1/completions", {"prompt": "Hi", "allowed_token_ids": []}, 400, "allowed_token_ids", ["not be empty"]),
    ("/v1/completions", {"prompt": "Hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens",
     ["-1 (max_model_len) or at least 1"]),
    ("/v1/chat/completions", {"messages": CHAT, "bad_words": [" "]}, 400, "bad_words", ["non-blank"]),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt", ["exactly one"]),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", ["Token ids must be in"]),
]  # fmt: skip


@pytest.mark.parametrize("route,body,status,param,words", CASES)
def test_bad_request_is_answered_in_openai_error_shape(tiny_server, route, body, status, param, words):
    response = httpx.post(f"{tiny_server.url}{route}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


def test_malformed_json_is_a_400(tiny_server):
    response = httpx.post(
        f"{tiny_server.url}/v1/completions", content=b'{"prompt": "Hi",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_unknown_route_and_method_use_the_error_shape(tiny_server):
    missing = httpx.get(f"{tiny_server.url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(f"{tiny_server.url}/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


@pytest.mark.parametrize(
    "parameters,words",
    [({"temperature": 0}, ["temperature", "strictly positive"]), ({"max_new_tokens": 0}, ["max_new_tokens"]),
     ({"top_p": 2.0}, ["top_p"]), ({"best_of": 2}, ["not supported"]), ({"max_new_tokens": "many"}, ["integer"])],
)  # fmt: skip
def test_tgi_routes_answer_in_tgi_error_shape(tiny_server, parameters, words):
    response = httpx.post(f"{tiny_server.url}/generate", json={"inputs": "Hi", "parameters": parameters})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    for word in words:
        assert word in body["error"], body["error"]


def test_rejected_requests_never_reach_the_engine(tiny_server):
    before = tiny_server.metrics()
    for route, body, *_ in CASES:
        httpx.post(f"{tiny_server.url}{route}", json=body, timeout=30)
    after = tiny_server.metrics()
    for name in ("kvserve:request_queue_time_seconds_count", "kvserve:time_to_first_token_seconds_count",
                 "kvserve:requests_aborted_total", "kvserve:prefix_cache_queries_total"):  # fmt: skip
        assert after[name] == before[name], name
