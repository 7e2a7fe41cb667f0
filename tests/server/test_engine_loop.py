"""The engine thread on a fake engine (no model, no HTTP): updates reach the asyncio side, a
failing step fails its requests with a 500 and the thread lives on, aborts free the pages."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from detcompile.engine import SamplingParams
from detcompile.engine.engine import CompletionOutput, RequestOutput
from detcompile.server.engine_loop import EngineLoop, Handle


class FakeEngine:
    """Emits token ids 100, 101, ... one per step; a sequence holds one page per token."""

    def __init__(self):
        self.requests, self.fail_next = {}, False
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "aborted": 0}
        self.blocks = SimpleNamespace(num_blocks=100, usage=0.0, num_free=99, hit_tokens=0, queried_tokens=0)
        self.scheduler = SimpleNamespace(waiting=[], running=[], num_preemptions=0)
        self.runner = SimpleNamespace(device=torch.device("cpu"))
        self.tokenizer = None

    def add_request(self, ids, params, rid):
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        self.requests[rid] = [SimpleNamespace(request_id=rid, params=params, output=[], logprobs=[], top_logprobs=[],
                                              finish_reason=None, finished=False, block_table=[], seed=params.seed)
                              for _ in range(params.n)]

    def has_unfinished(self):
        return any(not s.finished for seqs in self.requests.values() for s in seqs)

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        changed = []
        for seqs in self.requests.values():
            for s in seqs:
                if s.finished:
                    continue
                s.output.append(100 + len(s.output))
                s.block_table.append(len(s.output))
                if len(s.output) >= s.params.max_new_tokens:
                    s.finished, s.finish_reason, s.block_table = True, "length", []
                changed.append(s)
        return changed

    def abort(self, rid):
        for s in self.requests[rid]:
            if not s.finished:
                s.finished, s.finish_reason, s.block_table = True, "abort", []
        self.stats["aborted"] += 1

    def pop_output(self, rid):
        seqs = self.requests.pop(rid)
        return RequestOutput(rid, [1], [CompletionOutput(i, list(s.output), None, None, None, s.finish_reason, 0)
                                        for i, s in enumerate(seqs)])


async def _collect(sink, until_final=True, timeout=10.0):
    got = []
    while True:
        u = await asyncio.wait_for(sink.get(), timeout)
        got.append(u)
        if u.error is not None or (until_final and u.final is not None):
            return got


def test_stream_updates_final_and_failure_recovery():
    eng = FakeEngine()
    loop_thread = EngineLoop(eng)
    loop_thread.start()

    async def main():
        loop = asyncio.get_running_loop()
        sink = asyncio.Queue()
        loop_thread.submit([Handle("a", [1], SamplingParams(max_new_tokens=4, n=2), 0, True, sink, loop)])
        ups = await _collect(sink)
        tokens = [sum((d.token_ids for d in u.samples), []) for u in ups]
        assert sum(len(t) for t in tokens) == 8  # 2 samples x 4 tokens, delivered step by step
        assert ups[-1].final.outputs[1].token_ids == [100, 101, 102, 103]
        assert ups[-1].samples[0].finish_reason == "length"
        # A non-streaming request gets one update, the final one.
        sink2 = asyncio.Queue()
        loop_thread.submit([Handle("b", [1], SamplingParams(max_new_tokens=3), 0, False, sink2, loop)])
        ups = await _collect(sink2)
        assert len(ups) == 1 and ups[0].final.token_ids == [100, 101, 102]
        # A duplicate id is refused with a 400-type error at once; then the next step raises, which
        # fails the requests in it with a 500; the thread lives on.
        eng.fail_next = True
        sink3 = asyncio.Queue()
        loop_thread.submit([Handle("c", [1], SamplingParams(max_new_tokens=50), 0, False, sink3, loop),
                            Handle("c", [1], SamplingParams(max_new_tokens=2), 1, False, sink3, loop)])
        err = await _collect(sink3)
        assert err[-1].error and "already in use" in err[-1].error and err[-1].error_status == 400
        err = await _collect(sink3)
        assert err[-1].error_status == 500 and "internal" in err[-1].error
        sink4 = asyncio.Queue()
        loop_thread.submit([Handle("d", [1], SamplingParams(max_new_tokens=2), 0, False, sink4, loop)])
        assert (await _collect(sink4))[-1].final.token_ids == [100, 101]
        # Abort: the pages it held are counted as freed.
        sink5 = asyncio.Queue()
        loop_thread.submit([Handle("e", [1], SamplingParams(max_new_tokens=10**6), 0, True, sink5, loop)])
        await asyncio.wait_for(sink5.get(), 10)  # it is running
        loop_thread.abort("e")
        ups = await _collect(sink5)
        assert ups[-1].final.finish_reason == "abort"

    asyncio.run(main())
    assert loop_thread.alive
    loop_thread.stop()
    assert not loop_thread.alive
    snap = loop_thread.snapshot  # (final once the thread has stopped)
    assert snap["failed_steps"] == 1 and snap["aborted"] == 2  # the failed request, the dropped one
    assert snap["aborted_kv_blocks_freed"] >= 1
