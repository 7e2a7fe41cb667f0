"""Bad input gets a 400 (or 401/404) JSON error naming the problem, never a 5xx, and changes nothing."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import httpx
import pytest

from .conftest import API_KEY

G = "/generate"
C = "/v1/completions"
CH = "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]

CASES = [
    # (path, json body, words the message must contain)
    (G, {}, "exactly one of"),
    (G, {"text": "a", "input_ids": [1]}, "exactly one of"),
    (G, {"text": ""}, "empty"),
    (G, {"text": []}, "empty"),
    (G, {"input_ids": []}, "empty"),
    (G, {"input_ids": [[]]}, "empty"),
    (G, {"text": 5}, "text"),
    (G, {"input_ids": [1, "a"]}, "input_ids"),
    (G, {"input_ids": [1, 99999]}, "outside the vocabulary"),
    (G, {"input_ids": [1, -3]}, "outside the vocabulary"),
    (G, {"text": "a" * 600}, "max_model_len"),
    (G, {"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
    (G, {"text": "a", "sampling_params": {"temperature": "hot"}}, "temperature"),
    (G, {"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
    (G, {"text": "a", "sampling_params": {"top_k": 100000}}, "top_k"),
    (G, {"text": "a", "sampling_params": {"max_new_tokens": -5}}, "max_new_tokens"),
    (G, {"text": "a", "sampling_params": {"max_new_tokens": 10**12}}, "max_new_tokens"),
    (G, {"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
    (G, {"text": "a", "sampling_params": {"n": 0}}, "n "),
    (G, {"text": "a", "sampling_params": {"n": 500}}, "n "),
    (G, {"text": "a", "sampling_params": {"sampling_seed": -1}}, "sampling_seed"),
    (G, {"text": "a", "sampling_params": {"sampling_seed": 2**70}}, "sampling_seed"),
    (G, {"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
    (G, {"text": "a", "sampling_params": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    (G, {"text": "a", "sampling_params": {"frequency_penalty": 9}}, "frequency_penalty"),
    (G, {"text": "a", "sampling_params": {"ignore_eos": "yes"}}, "ignore_eos"),
    (G, {"text": "a", "sampling_params": {"max_tokens": 3}}, "max_tokens"),
    (G, {"text": "a", "sampling_params": [{}, {}]}, "sampling_params"),
    (G, {"text": "a", "return_logprob": True, "top_logprobs_num": 1000}, "top_logprobs_num"),
    (G, {"text": "a", "logprob_start_len": -7}, "logprob_start_len"),
    (G, {"text": "a", "regex": "[a-z]+"}, "regex"),
    (G, {"text": ["a"] * 40}, "at most"),
    (G, {"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
    (C, {"model": "detcompile-tiny"}, "prompt"),
    (C, {"model": "nope", "prompt": "a"}, "unknown model"),
    (C, {"prompt": "a"}, "model"),
    (C, {"model": "detcompile-tiny", "prompt": ""}, "empty"),
    (C, {"model": "detcompile-tiny", "prompt": [[]]}, "empty"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "max_tokens": 5000}, "maximum context length"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "n": 200}, "n "),
    (C, {"model": "detcompile-tiny", "prompt": "a", "logprobs": 50}, "logprobs"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "seed": "abc"}, "seed"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias"),
    (C, {"model": "detcompile-tiny", "prompt": "a", "best_of": 3}, "best_of"),
    (CH, {"model": "detcompile-tiny", "messages": []}, "messages"),
    (CH, {"model": "detcompile-tiny", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    (CH, {"model": "detcompile-tiny", "messages": OK_CHAT, "top_logprobs": 2}, "logprobs"),
    (CH, b'{"model": "detcompile-tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
     "temperature"),
    (G, b'{"text": "a", "sampling_params": {"top_p": NaN}}', "top_p"),
    (CH, {"model": "other", "messages": OK_CHAT}, "unknown model"),
]


@pytest.mark.parametrize("path,body,words", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_400(client, path, body, words):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert words in err["message"], err["message"]
    assert err["code"] == 400 and err["type"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe"])
def test_malformed_json(client, raw):
    r = client.post(G, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_api_key(server):
    assert httpx.get(server.url + "/health").status_code == 200  # open
    for path in ("/get_model_info", "/metrics", "/v1/models"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(server.url + G, json={"text": "a"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = httpx.post(server.url + G, json={"text": "a", "sampling_params": {"max_new_tokens": 1}},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200


def test_unknown_route_and_method(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert client.get("/generate").status_code == 405


def test_nothing_was_queued_and_the_server_still_serves(server, client):
    m = server.metrics()
    assert m["inflight_sequences"] == 0 and m["engine_failed_steps_total"] == 0
    r = client.post(G, json={"text": "still fine", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    assert "internal server error" not in server.log_text()


def test_huge_body_is_refused_unread(client):
    r = client.post(G, content=b'{"text": "' + b"a" * (33 << 20) + b'"}')
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
