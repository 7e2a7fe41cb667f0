"""``detcompile serve --tp N``: rank 0 serves HTTP and the other ranks follow its engine call for
call (gloo on the CPU). The answers at --tp 2 are the bits of --tp 1 (one process), concurrent
clients, an abort and a cache flush included; the fingerprint is the same, the size is reported;
SIGTERM stops every rank; bad setups are refused before any rank starts."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import concurrent.futures
import os
import signal
import threading

import pytest
import torch

from ._util import sse_events
from .conftest import ServerProcess
from .test_replicas import _strip

REQUESTS = [
    # greedy, output and prompt logprobs with alternatives
    ("/generate", {"text": "The sea", "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0,
                   "sampling_params": {"temperature": 0.0, "max_new_tokens": 8}}),
    # seeded sampling, n = 2, a list of prompts, logprobs
    ("/generate", {"text": ["A quiet town,", "The sea"], "return_logprob": True,
                   "sampling_params": {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 10,
                                       "sampling_seed": 5, "n": 2}}),
    ("/v1/completions", {"model": "detcompile-tiny", "prompt": "Once", "max_tokens": 8, "seed": 9, "logprobs": 3}),
]


def _concurrent_requests():
    """Six different requests (lengths, temperatures, seeds) for six clients at once."""
    prompts = ["Hi", "The river bends south", "A" * 30, "Numbers: 1 2 3", "x", "Once upon a time,"]
    return [{"text": p, "return_logprob": True, "top_logprobs_num": i % 2,
             "sampling_params": {"temperature": [0.0, 0.8, 1.2][i % 3], "sampling_seed": 20 + i,
                                 "max_new_tokens": 5 + i}} for i, p in enumerate(prompts)]


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ranks(launcher: int) -> list[int]:
    """The rank processes of a --tp launcher (its spawned children, not the resource tracker)."""
    ranks = []
    for pid in _children(launcher):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    ranks.append(pid)
        except OSError:
            pass
    return ranks


def _stream_until_aborted(client, url_client_factory):
    """A long streamed generation, aborted by id through /abort_request once it has produced tokens;
    returns its last event."""
    body = {"text": "Keep talking: ", "rid": "long-one", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0.0}}
    with client.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 2:
                    with url_client_factory() as other:
                        assert other.post("/abort_request", json={"rid": "long-one"}).status_code == 200
                    break
        rest = sse_events(lines)
    return rest[-1]


@pytest.mark.slow  # ~45 s (three server processes); the default run covers the lockstep and the engine at TP 2
def test_tp2_serves_the_bits_of_tp1_and_stops_cleanly():
    procs = {tp: ServerProcess(f"tp{tp}", ["--tp", str(tp)]) for tp in (1, 2)}  # they start side by side
    try:
        one, two = procs[1].wait(), procs[2].wait()
        assert len(_ranks(two.proc.pid)) == 2
        with one.client() as a, two.client() as b:
            ia, ib = a.get("/get_model_info").json(), b.get("/get_model_info").json()
            assert (ia["tensor_parallel_size"], ib["tensor_parallel_size"]) == (1, 2)
            # Every TP size gives the same bits: one fingerprint (it hashes the whole model's weights).
            assert ia["system_fingerprint"] == ib["system_fingerprint"]
            assert ia["fingerprint_components"]["tensor_parallel"] is True

            def both(path, body):
                ra, rb = a.post(path, json=body), b.post(path, json=body)
                assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
                assert _strip(ra.json()) == _strip(rb.json()), path
                return rb.json()

            for path, body in REQUESTS:
                both(path, body)
            out = both(*REQUESTS[0])
            assert len(out["meta_info"]["output_token_logprobs"]) == 8
            assert len(out["meta_info"]["input_token_logprobs"]) == out["meta_info"]["prompt_tokens"]

            # Concurrent clients at --tp 2 (batched together on every rank) get --tp 1's serial answers.
            reqs = _concurrent_requests()
            serial = [_strip(a.post("/generate", json=r).json()) for r in reqs]
            barrier = threading.Barrier(len(reqs))

            def one_client(r):
                with two.client() as c:
                    barrier.wait()
                    resp = c.post("/generate", json=r)
                    assert resp.status_code == 200, resp.text
                    return _strip(resp.json())

            with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
                assert list(pool.map(one_client, reqs)) == serial

            # An abort and a cache flush reach every rank (a rank that missed one would be out of step
            # from the next step on: the server would stop and these requests fail).
            last = _stream_until_aborted(b, two.client)
            assert last["meta_info"]["finish_reason"]["type"] == "abort"
            assert b.post("/flush_cache").status_code == 200
            for path, body in REQUESTS:
                both(path, body)
            m = two.metrics()
            assert m["requests_aborted_total"] == 1 and m["engine_failed_steps_total"] == 0

        # SIGTERM to the launcher stops rank 0's HTTP server, which stops the other rank: all exit 0.
        ranks = _ranks(two.proc.pid)
        two.proc.send_signal(signal.SIGTERM)
        assert two.proc.wait(30) == 0, two.log_text()[-3000:]
        log = two.log_text()
        assert "rank 0 stopped" in log and "rank 1 stopped" in log, log[-3000:]
        assert "Traceback" not in log and "leaked" not in log, log[-3000:]
        assert not any(_alive(p) for p in ranks)
    finally:
        for p in procs.values():
            p.stop()


@pytest.mark.slow
def test_a_dead_rank_stops_the_server_with_an_error():
    p = ServerProcess("tp2-kill", ["--tp", "2"])
    try:
        p.wait()
        launcher = p.proc.pid
        ranks = _ranks(launcher)
        assert len(ranks) == 2
        follower = max(ranks)  # spawned second: rank 1
        os.kill(follower, signal.SIGKILL)
        assert p.proc.wait(60) != 0
        log = p.log_text()
        assert "tensor-parallel rank" in log and "failed" in log, log[-3000:]
        assert not any(_alive(r) for r in ranks)
    finally:
        p.stop()


# -- refused before any rank starts (in this process: no spawn, no weights, no port) ----------------


def _serve(capsys, *argv) -> str:
    from detcompile.cli import main

    assert main(["serve", "--port", "0", *argv]) == 2
    return capsys.readouterr().err


def test_bad_tp_setups_are_refused_early(capsys, tmp_path, monkeypatch):
    assert "--tp must be >= 1" in _serve(capsys, "--model", "tiny", "--tp", "0")
    assert "drop --no-deterministic" in _serve(capsys, "--model", "tiny", "--tp", "2", "--no-deterministic")
    assert "not divisible by TP size 4" in _serve(capsys, "--model", "demo", "--tp", "4")  # 2 KV heads on the CPU
    from detcompile.models import tiny_model

    tiny_model("gpt2").save_pretrained(tmp_path)  # not Llama-style: the shard's message
    assert "not a Llama-style causal LM" in _serve(capsys, "--model", str(tmp_path), "--tokenizer", "tiny",
                                                   "--tp", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "needs 2 GPUs, one per rank; 1 visible" in _serve(capsys, "--model", "tiny", "--tp", "2", "--device", "cuda")
    assert "not cuda:1" in _serve(capsys, "--model", "tiny", "--tp", "2", "--device", "cuda:1")


# -- the lockstep itself, on fake engines (no processes) ---------------------------------------------


def test_a_follower_replays_the_leaders_calls_and_notices_a_missed_one(monkeypatch):
    from detcompile.engine import SamplingParams
    from detcompile.server import lockstep

    from .test_engine_loop import FakeEngine

    class Counting(FakeEngine):
        def add_request(self, ids, params, rid, keep_logits=False):
            super().add_request(ids, params, rid)
            self.stats["requests"] += 1

        def generate(self, *a, **kw):  # an engine call the leader does not replicate
            raise AssertionError("reached the engine")

    wire = []

    def broadcast(objs, src, group):  # the leader appends, the follower takes, in order
        if objs[0] is not None:
            wire.append(objs[0])
        else:
            objs[0] = wire.pop(0)

    monkeypatch.setattr(lockstep.dist, "broadcast_object_list", broadcast)
    leader_engine = Counting()
    leader = lockstep.LeaderEngine(leader_engine, group=None)
    leader.add_request([1], SamplingParams(max_new_tokens=5), "a")
    with pytest.raises(ValueError, match="already in use"):
        leader.add_request([1], SamplingParams(), "a")  # refused by the engine: not sent
    leader.add_request([1], SamplingParams(max_new_tokens=2, n=2), "b")
    for _ in range(3):
        leader.step()
    leader.abort("a")
    leader.pop_output("b")
    leader.end()
    with pytest.raises(AttributeError, match="not replicated"):
        leader.generate  # noqa: B018  (its effect would not reach the followers)
    assert [m[1] for m in wire] == ["step", "step", "step", "shutdown"]

    good = list(wire)
    follower = Counting()
    lockstep.follow(follower, None, 1)
    assert list(follower.requests) == ["a"] == list(leader_engine.requests)
    a, b = follower.requests["a"][0], leader_engine.requests["a"][0]
    assert (a.output, a.finish_reason) == (b.output, b.finish_reason) == ([100, 101, 102], "abort")

    wire[:] = good
    wire[0] = (wire[0][0][1:], *wire[0][1:])  # the follower misses the first add
    with pytest.raises(RuntimeError, match="out of step with rank 0"):
        lockstep.follow(Counting(), None, 1)
