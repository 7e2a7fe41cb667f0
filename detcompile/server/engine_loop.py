"""The one thread that owns the ``Engine`` (which is not thread-safe).

HTTP handlers never touch the engine: they put commands into an inbox (add these requests, abort
that one, run this function) and read ``Update`` objects from their own ``asyncio.Queue``. The loop
drains the inbox, runs one ``engine.step()`` (so every request that arrived meanwhile joins the same
batch) and posts to each changed request's queue: every step's new tokens for a streaming request,
only the final result otherwise. All data posted is a copy, never an engine object.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..engine import Engine, RequestOutput, SamplingParams
from .lockstep import LockstepBroken

log = logging.getLogger("detcompile.server")


@dataclass
class SampleDelta:
    """What one sample produced since the last update."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list | None
    finish_reason: str | None = None
    matched: int | str | None = None  # the EOS/stop token id or stop string that ended it


@dataclass
class Update:
    index: int  # which prompt of the HTTP request
    samples: list[SampleDelta] = field(default_factory=list)
    final: RequestOutput | None = None  # set once every sample has finished
    error: str | None = None
    error_status: int = 400  # 500 for an engine failure


@dataclass
class Handle:
    """One engine request (one prompt, its n samples) and where its updates go."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    index: int
    stream: bool
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    t0: float = field(default_factory=time.perf_counter)
    sent: list[int] = field(default_factory=list)  # tokens posted per sample (engine thread only)


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        # Under tensor parallelism the engine is a lockstep.LeaderEngine: an idle loop keeps the
        # other ranks posted, and the loop's end tells them to stop. A plain Engine needs neither.
        self._idle = getattr(engine, "idle", None)
        self._end = getattr(engine, "end", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, Handle] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detcompile-engine", daemon=True)
        self.aborted_kv_blocks_freed = 0
        self.finished_requests = 0
        self.failed_steps = 0
        self.snapshot: dict = {}
        self._take_snapshot()

    # -- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, handles: list[Handle]) -> None:
        """Queue requests; all of them reach the engine before its next step."""
        self._inbox.put(("add", handles))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all",))

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps; its result comes in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        dev = eng.runner.device
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)  # the current device is per thread; kernels launch on the engine's
        try:
            while not self._stop.is_set():
                if not eng.has_unfinished():
                    try:
                        cmd = self._inbox.get(timeout=0.05)
                    except queue.Empty:
                        if self._idle is not None:
                            self._idle()
                        continue
                    self._do(cmd)
                while True:
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._do(cmd)
                if eng.has_unfinished():
                    try:
                        changed = eng.step()
                    except LockstepBroken:
                        raise
                    except Exception:  # noqa: BLE001  (never let one bad step kill the server)
                        self._fail_all(traceback.format_exc())
                        changed = []
                    self._publish(changed)
                self._take_snapshot()
        except LockstepBroken:
            # The ranks are out of step: no engine call can succeed now. Answer every client (500)
            # and end the thread (/health says so); the LeaderEngine has asked the server to stop.
            self._fail_all(traceback.format_exc())
        finally:
            if self._end is not None:
                self._end()

    def _do(self, cmd) -> None:
        try:
            self._do_command(cmd)
        except Exception:  # noqa: BLE001  (a command must not kill the thread)
            log.error("engine command %s failed:\n%s", cmd[0], traceback.format_exc())

    def _do_command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            for h in cmd[1]:
                try:
                    self.engine.add_request(h.prompt_ids, h.params, h.rid)
                except ValueError as e:
                    self._post(h, Update(h.index, error=str(e)))
                    continue
                except Exception:  # noqa: BLE001
                    log.error("add_request failed:\n%s", traceback.format_exc())
                    self._post(h, Update(h.index, error="internal engine error (see the server log)", error_status=500))
                    continue
                h.sent = [0] * h.params.n
                self._handles[h.rid] = h
        elif kind == "abort":
            self._abort(cmd[1])
        elif kind == "abort_all":
            for rid in list(self._handles):
                self._abort(rid)
        elif kind == "call":
            fn, fut = cmd[1], cmd[2]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)

    def _abort(self, rid: str) -> None:
        h = self._handles.get(rid)
        seqs = self.engine.requests.get(rid)
        if seqs is None:
            return
        if any(not s.finished for s in seqs):
            self.aborted_kv_blocks_freed += sum(len(s.block_table) for s in seqs if not s.finished)
            self.engine.abort(rid)
        if h is not None:
            self._publish_one(rid, h)  # what it has so far, finish_reason "abort"
        else:
            self.engine.pop_output(rid)

    def _fail_all(self, tb: str) -> None:
        self.failed_steps += 1
        log.error("engine step failed; failing its %d requests:\n%s", len(self._handles), tb)
        for rid, h in list(self._handles.items()):
            self._fail_one(rid, h)
        self._handles.clear()

    def _fail_one(self, rid: str, h: Handle) -> None:
        """Drop a request the engine failed on (best effort) and tell its client: a 500, once."""
        try:
            self.engine.abort(rid)
            self.engine.pop_output(rid)
        except Exception:  # noqa: BLE001  (the engine is already in trouble; the client must still hear)
            pass
        self._post(h, Update(h.index, error="internal engine error (see the server log)", error_status=500))

    def _publish(self, changed) -> None:
        for rid in dict.fromkeys(s.request_id for s in changed):
            h = self._handles.get(rid)
            if h is None:
                continue
            try:
                self._publish_one(rid, h)
            except Exception:  # noqa: BLE001
                log.error("publishing %s failed:\n%s", rid, traceback.format_exc())
                self._handles.pop(rid, None)
                self._fail_one(rid, h)

    def _publish_one(self, rid: str, h: Handle) -> None:
        eng = self.engine
        seqs = eng.requests[rid]
        done = all(s.finished for s in seqs)
        if not (done or h.stream):
            return
        deltas = []
        for i, s in enumerate(seqs):
            k = h.sent[i]
            want = s.params.logprobs is not None
            deltas.append(SampleDelta(
                list(s.output[k:]), list(s.logprobs[k:]) if want else None,
                list(s.top_logprobs[k:]) if want and s.params.logprobs else None,
                s.finish_reason, _matched(eng, s) if s.finished else None))
            h.sent[i] = len(s.output)
        update = Update(h.index, deltas)
        if done:
            update.final = eng.pop_output(rid)
            del self._handles[rid]
            self.finished_requests += 1
        if done or any(d.token_ids for d in deltas):
            self._post(h, update)

    @staticmethod
    def _post(h: Handle, update: Update) -> None:
        try:
            h.loop.call_soon_threadsafe(h.sink.put_nowait, update)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    def _take_snapshot(self) -> None:
        eng, b = self.engine, self.engine.blocks
        usable = b.num_blocks - 1
        self.snapshot = dict(
            eng.stats, waiting=len(eng.scheduler.waiting), running=len(eng.scheduler.running),
            kv_usage=b.usage, kv_blocks_total=usable, kv_blocks_used=usable - b.num_free,
            hit_tokens=b.hit_tokens, queried_tokens=b.queried_tokens, preemptions=eng.scheduler.num_preemptions,
            aborted_kv_blocks_freed=self.aborted_kv_blocks_freed, finished=self.finished_requests,
            failed_steps=self.failed_steps)


def _matched(eng: Engine, s) -> int | str | None:
    """What ended a finished sample: the stop string, or the EOS / stop token id."""
    if s.finish_reason != "stop":
        return None
    if s.stopped_by_string:
        stops = [s.params.stop] if isinstance(s.params.stop, str) else list(s.params.stop)
        text = eng.tokenizer.decode(s.output, skip_special_tokens=s.params.skip_special_tokens)
        rest = text[len(s.text):]
        return next((x for x in stops if rest.startswith(x)), stops[0])
    return s.output[-1] if s.output else None
