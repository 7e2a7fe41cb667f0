"""/generate as the reference system's clients send it: a prompt, a list, token ids, streaming,
logprobs from logprob_start_len=0, /flush_cache between calls, seeds."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import pytest

from ._util import result_key, sse_events

PROMPT = "Tell me about the sea: "
SP = {"temperature": 0.8, "max_new_tokens": 12, "sampling_seed": 7}


def gen(client, **body):
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_single_prompt_shape_and_fingerprint(server, client):
    r = client.post("/generate", json={"text": PROMPT, "sampling_params": SP})
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    m = out["meta_info"]
    assert m["prompt_tokens"] == len(PROMPT) + 1  # the character tokenizer adds <s>
    assert m["completion_tokens"] == len(out["output_ids"]) == 12
    assert m["finish_reason"] == {"type": "length", "length": 12}
    assert m["sampling_seed"] == 7
    fp = r.headers["x-detcompile-fingerprint"]
    assert fp.startswith("detc-det-") and m["system_fingerprint"] == fp
    assert r.headers["x-detcompile-seed"] == "7"
    info = client.get("/get_model_info").json()
    assert info["system_fingerprint"] == fp and info["deterministic"] is True
    assert len(info["fingerprint_components"]["weights_sha256"]) == 64


def test_list_of_texts_equals_single_requests(client):
    prompts = [PROMPT, "Once upon a time", PROMPT, "abc"]
    batch = gen(client, text=prompts, sampling_params=SP)
    assert isinstance(batch, list) and len(batch) == 4
    for p, b in zip(prompts, batch):
        assert result_key(gen(client, text=p, sampling_params=SP)) == result_key(b)
    assert result_key(batch[0]) == result_key(batch[2])


def test_input_ids_single_and_list(client):
    ids = [1, 40, 41, 42, 43, 44]
    one = gen(client, input_ids=ids, sampling_params=SP)
    many = gen(client, input_ids=[ids, [1, 50, 51], ids], sampling_params=SP)
    assert isinstance(one, dict) and len(many) == 3
    assert result_key(one) == result_key(many[0]) == result_key(many[2])
    assert one["meta_info"]["prompt_tokens"] == 6


def test_seed_default_42_and_seeds_differ(client):
    base = {"temperature": 1.0, "max_new_tokens": 12}
    a = gen(client, text=PROMPT, sampling_params=base)
    b = gen(client, text=PROMPT, sampling_params={**base, "sampling_seed": 42})
    c = gen(client, text=PROMPT, sampling_params={**base, "sampling_seed": 43})
    assert a["meta_info"]["sampling_seed"] == 42
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_n_samples_replay_as_plain_requests(client):
    res = gen(client, text=PROMPT, sampling_params={**SP, "n": 3})
    assert isinstance(res, list) and len(res) == 3
    assert len({tuple(r["output_ids"]) for r in res}) == 3
    for r in res:  # each sample's reported seed replays it alone
        alone = gen(client, text=PROMPT, sampling_params={**SP, "sampling_seed": r["meta_info"]["sampling_seed"]})
        assert alone["output_ids"] == r["output_ids"]


def test_logprobs_from_start_and_flush_cache(client):
    body = dict(text=PROMPT, sampling_params=SP, return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                return_text_in_logprobs=True)
    first = gen(client, **body)
    m = first["meta_info"]
    n_prompt = m["prompt_tokens"]
    assert len(m["input_token_logprobs"]) == n_prompt
    assert m["input_token_logprobs"][0][0] is None and m["input_token_logprobs"][0][1] == 1
    assert all(isinstance(e[0], float) and e[0] <= 0 for e in m["input_token_logprobs"][1:])
    assert [e[2] for e in m["input_token_logprobs"][1:]] == list(PROMPT)
    assert [e[1] for e in m["output_token_logprobs"]] == first["output_ids"]
    assert len(m["output_top_logprobs"]) == 12 and all(len(t) == 3 for t in m["output_top_logprobs"])
    assert m["input_top_logprobs"][0] is None and len(m["input_top_logprobs"][1]) == 3
    warm = gen(client, **body)  # (prompt logprobs are always computed, never from the cache)
    assert client.post("/flush_cache").status_code == 200
    cold = gen(client, **body)
    assert result_key(first) == result_key(warm) == result_key(cold)
    assert first["meta_info"]["input_token_logprobs"] == cold["meta_info"]["input_token_logprobs"]
    # A start inside the prompt returns that suffix.
    part = gen(client, **{**body, "logprob_start_len": 5})["meta_info"]["input_token_logprobs"]
    assert part == m["input_token_logprobs"][5:]


def test_prefix_cache_hit_gives_the_same_bits(client):
    long = "The harbor lights were on. " * 8
    body = dict(text=long, sampling_params=SP, return_logprob=True)
    assert client.post("/flush_cache").status_code == 200
    cold = gen(client, **body)
    warm = gen(client, **body)
    assert cold["meta_info"]["cached_tokens"] == 0 and warm["meta_info"]["cached_tokens"] > 0
    assert result_key(cold) == result_key(warm)


def test_streaming_matches_non_streaming(client):
    body = dict(text=PROMPT, sampling_params=SP, return_logprob=True)
    full = gen(client, **body)
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert len(events) >= 2
    ids = [len(e["output_ids"]) for e in events]
    assert ids == sorted(ids)  # cumulative
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert result_key(last) == result_key(full)


def test_streaming_a_list(client):
    with client.stream("POST", "/generate", json={"text": [PROMPT, "xyz"], "sampling_params": SP,
                                                   "stream": True}) as r:
        events = sse_events(r.iter_lines())
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1]
    assert finals[0]["output_ids"] == gen(client, text=PROMPT, sampling_params=SP)["output_ids"]


def test_stop_string_and_stop_token(client):
    free = gen(client, input_ids=[1, 40, 41], sampling_params={**SP, "max_new_tokens": 24})
    ids = free["output_ids"]
    r = gen(client, input_ids=[1, 40, 41], sampling_params={**SP, "max_new_tokens": 24, "stop_token_ids": [ids[3]]})
    first = ids.index(ids[3])
    assert r["output_ids"] == ids[:first + 1]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[3]}
    texty = [c for c in free["text"] if c.strip()]
    if texty:  # a stop string cuts the text before it
        s = texty[0]
        r = gen(client, input_ids=[1, 40, 41], sampling_params={**SP, "max_new_tokens": 24, "stop": s})
        assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
        assert r["text"] == free["text"][:free["text"].index(s)]


@pytest.mark.parametrize("mode", ["one request", "separate requests"])
def test_reference_client_single_mode(client, mode):
    """The reference client's 'single' mode: the same prompt in batches of 1..N; one unique text."""
    texts = set()
    for b in range(1, 4):
        if mode == "one request":
            res = gen(client, text=[PROMPT] * b, sampling_params={"temperature": 0.0, "max_new_tokens": 8,
                                                                  "sampling_seed": 42}, return_logprob=False)
        else:
            res = [gen(client, text=PROMPT, sampling_params={"temperature": 0.0, "max_new_tokens": 8})
                   for _ in range(b)]
        texts |= {(r["text"], tuple(r["output_ids"])) for r in res}
    assert len(texts) == 1
