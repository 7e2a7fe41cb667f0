"""Concurrent clients are batched together and get exactly what they get one at a time; a client
that leaves mid-stream aborts its request and frees its KV blocks; past the queue bound, 503."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import concurrent.futures
import json
import re
import threading
import time

import httpx

from ._util import result_key
from .conftest import MAX_NUM_SEQS, MAX_QUEUE

N_CLIENTS = 32


def _requests():
    """32 different requests: 8 prompts of different lengths x seeds/temperatures, some with top logprobs."""
    prompts = ["Hi", "The river bends south", "A" * 40, "Numbers: 1 2 3 4 5 6 7", "Question: why?",
               "The harbor lights were on. " * 3, "x", "Once upon a time, in a quiet town,"]
    out = []
    for i in range(N_CLIENTS):
        out.append({"text": prompts[i % 8], "return_logprob": True, "top_logprobs_num": i % 3,
                    "sampling_params": {"temperature": [0.0, 0.7, 1.0, 1.3][i // 8], "sampling_seed": 100 + i,
                                        "max_new_tokens": 4 + i % 5}})
    return out


def _wait_idle(server, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = server.metrics()
        if m["inflight_sequences"] == 0 and m["running_sequences"] == 0 and m["queue_length"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {m}")



def wait_for_abort(server, m0: dict, timeout: float = 20.0) -> dict:
    """The metrics once the server has aborted one more request and freed every KV block (or the last
    ones read at the timeout: the caller's asserts say what was missing)."""
    t0 = time.time()
    while True:
        m = server.metrics()
        done = m["requests_aborted_total"] > m0["requests_aborted_total"] and m["kv_cache_blocks_used"] == 0
        if done or time.time() - t0 > timeout:
            return m
        time.sleep(0.1)

def test_concurrent_clients_get_their_serial_answers(server, client):
    reqs = _requests()
    client.post("/flush_cache")
    serial = [result_key(client.post("/generate", json=r).json()) for r in reqs]
    client.post("/flush_cache")
    steps0 = server.metrics()["engine_steps_total"]
    barrier = threading.Barrier(N_CLIENTS)

    def one(r):
        with server.client() as c:
            barrier.wait()
            resp = c.post("/generate", json=r)
            assert resp.status_code == 200, resp.text
            return result_key(resp.json())

    with concurrent.futures.ThreadPoolExecutor(N_CLIENTS) as pool:
        together = list(pool.map(one, reqs))
    assert together == serial
    # They were batched: far fewer engine steps than the serial run's sum of (prompt chunk + tokens).
    steps = server.metrics()["engine_steps_total"] - steps0
    assert steps < sum(r["sampling_params"]["max_new_tokens"] for r in reqs) / 2


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    m0 = _wait_idle(server)
    body = {"text": "Keep talking: ", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}, "stream": True}
    with server.client() as c, c.stream("POST", "/generate", json=body) as r:
        got, used = 0, 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
                if got == 3:
                    used = server.metrics()["kv_cache_blocks_used"]
                    break  # (leaving iter_lines closes the connection)
    assert used > 0
    # The connection is closed: the server must abort the request and free its pages.
    m = wait_for_abort(server, m0)
    assert m["requests_aborted_total"] == m0["requests_aborted_total"] + 1
    assert m["kv_cache_blocks_used"] == 0 and m["inflight_sequences"] == 0
    assert m["aborted_kv_blocks_freed_total"] > m0["aborted_kv_blocks_freed_total"]
    assert m["generation_tokens_total"] - m0["generation_tokens_total"] < 400
    assert "client-disconnected" in server.log_text()


def test_overload_gets_503_with_retry_after_and_nothing_is_lost(server):
    _wait_idle(server)
    cap = MAX_NUM_SEQS + MAX_QUEUE
    hold = {"text": ["Hold on: "] * (cap - 2), "sampling_params": {"max_new_tokens": 300, "ignore_eos": True},
            "stream": True}
    done = threading.Event()

    def holder():  # a streaming request taking nearly all the capacity, dropped once the test is done
        with server.client() as c, c.stream("POST", "/generate", json=hold) as r:
            for _ in r.iter_lines():
                if done.is_set():
                    break

    t = threading.Thread(target=holder)
    t.start()
    try:
        t0 = time.time()
        while server.metrics()["inflight_sequences"] < cap - 2 and time.time() - t0 < 20:
            time.sleep(0.05)
        with server.client() as c:
            r = c.post("/generate", json={"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "overloaded" in r.json()["error"]["message"]
            # Two more still fit (accepted and queued: the stream opens with 200; leaving it aborts them).
            with c.stream("POST", "/generate", json={"text": ["a", "b"], "stream": True,
                                                      "sampling_params": {"max_new_tokens": 2}}) as ok:
                assert ok.status_code == 200
            too_big = c.post("/generate", json={"text": ["a"] * (cap + 1)})
            assert too_big.status_code == 400
    finally:
        done.set()
        t.join(30)
    m = _wait_idle(server)
    assert m["requests_rejected_overload_total"] >= 1


def test_non_streaming_client_that_leaves_is_aborted(server):
    m0 = _wait_idle(server)
    body = json.dumps({"text": "Long answer: ", "sampling_params": {"max_new_tokens": 450, "ignore_eos": True}})
    with server.client() as c:
        try:
            c.post("/generate", content=body, timeout=1.0)
        except httpx.TimeoutException:
            pass  # the client gives up and closes the connection
    m = wait_for_abort(server, m0)
    assert m["requests_aborted_total"] == m0["requests_aborted_total"] + 1
    assert m["kv_cache_blocks_used"] == 0


def test_metrics_text(server, client):
    client.post("/generate", json={"text": "metrics", "sampling_params": {"max_new_tokens": 2}})
    text = client.get("/metrics").text
    for name in ("requests_total", "generation_tokens_total", "prompt_tokens_total", "queue_length",
                 "kv_cache_usage_ratio", "prefix_cache_hit_rate", "requests_aborted_total",
                 "aborted_kv_blocks_freed_total"):
        assert f"# TYPE detcompile_{name} " in text and f"\ndetcompile_{name} " in text
    assert 'detcompile_info{model="detcompile-tiny",fingerprint="detc-det-' in text
    m = server.metrics()
    assert m["requests_total"] >= 1 and m["generation_tokens_total"] >= 2
    assert 0 <= m["prefix_cache_hit_rate"] <= 1
    # One log line per request: id, prompt and output tokens, latency.
    assert re.search(r"request gen-\w+ /generate prompts=1 prompt_tokens=8 cached_tokens=\d+ output_tokens=2 "
                     r"latency=[0-9.]+s status=ok", server.log_text())


def test_abort_request_by_rid(server):
    m0 = _wait_idle(server)
    result = {}

    def waiter():
        with server.client() as c:
            result["r"] = c.post("/generate", json={"text": "Go on: ", "rid": "abort-me", "sampling_params": {
                "max_new_tokens": 450, "ignore_eos": True}})

    t = threading.Thread(target=waiter)
    t.start()
    t0 = time.time()
    while server.metrics()["running_sequences"] == 0 and time.time() - t0 < 20:
        time.sleep(0.05)
    with server.client() as c:
        assert c.post("/abort_request", json={"rid": "abort-me"}).json() == {"success": True}
        assert c.post("/abort_request", json={}).status_code == 400
    t.join(20)
    r = result["r"]
    assert r.status_code == 200
    out = r.json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["id"] == "abort-me"
    assert 0 < len(out["output_ids"]) < 450 and out["meta_info"]["completion_tokens"] == len(out["output_ids"])
    m = _wait_idle(server)
    assert m["requests_aborted_total"] == m0["requests_aborted_total"] + 1 and m["kv_cache_blocks_used"] == 0
