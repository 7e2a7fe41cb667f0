"""Tensor-parallel serving: the other ranks' engines follow rank 0's, call for call.

Under ``detcompile serve --tp N`` every rank runs an ``Engine`` on its shard of the model. The
engines must see the same calls in the same order, so that their schedulers build the same batches
and their forwards meet in the same collectives. Only rank 0 serves HTTP. Its engine thread drives a
``LeaderEngine``, which records each call that changes the engine's state (add, abort, pop, flush)
and, before each step, broadcasts those calls and the step over a gloo control group; ``follow``
replays them on a follower's engine. Every rank computes the same tokens: the followers' are dropped.

A rank that fails or falls out of step cannot be repaired (its peers may wait in a collective), so
the whole server stops: ``LockstepBroken`` on rank 0, an exception (and a non-zero exit) on a follower.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("detcompile.server")

STEP, IDLE, SHUTDOWN = "step", "idle", "shutdown"
#: An idle leader still broadcasts this often (an empty IDLE), so that a follower's wait can time out.
HEARTBEAT_SECONDS = 5.0
#: How long a follower waits for rank 0's next message (the control group's timeout).
CONTROL_TIMEOUT = timedelta(minutes=5)


class LockstepBroken(RuntimeError):
    """The ranks can no longer be kept in step (a broadcast or a step failed): the server must stop."""


def control_group():
    """A gloo group of all ranks for the leader's messages (on CPU objects, whatever the default
    group's backend; its own timeout). Collective: every rank calls it once, in the same order."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


class LeaderEngine:
    """Rank 0's engine, as the server's engine thread sees it: the calls that change the engine's
    state are applied here and queued for the followers, and ``step`` sends them first. Other
    attributes are the engine's; its other methods are refused (their effect would not reach the
    followers), except the read-only ones of ``_READ_ONLY``."""

    _READ_ONLY = ("has_unfinished", "_check", "_tokenize", "_output")

    def __init__(self, engine, group, on_broken=None):
        self._engine, self._group, self._on_broken = engine, group, on_broken
        self._pending: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()  # one message at a time: the engine thread's, or end() at exit
        self._last_sent = time.monotonic()
        self._ended = False
        self.broken: str | None = None  # why the lockstep broke (then the server stops)

    def __getattr__(self, name):
        value = getattr(self._engine, name)
        if inspect.ismethod(value) and name not in self._READ_ONLY:
            raise AttributeError(f"LeaderEngine: Engine.{name} is not replicated to the other tensor-parallel ranks")
        return value

    # -- the replicated calls (an engine refuses a bad call before changing anything: such a call
    # raises here and is not sent) -----------------------------------------------------------------
    def add_request(self, prompt, params=None, request_id=None, keep_logits=False):
        return self._apply("add_request", prompt, params, request_id, keep_logits)

    def abort(self, request_id):
        return self._apply("abort", request_id)

    def pop_output(self, request_id):
        return self._apply("pop_output", request_id)

    def flush_cache(self):
        return self._apply("flush_cache")

    def _apply(self, name, *args):
        out = getattr(self._engine, name)(*args)
        self._pending.append((name, args))
        return out

    # -- messages ---------------------------------------------------------------------------------
    def step(self):
        self._send(STEP)
        try:
            return self._engine.step()
        except Exception as e:  # noqa: BLE001  (a follower may be waiting in a collective of this step)
            raise self._break(f"rank 0's step failed: {type(e).__name__}: {e}") from e

    def idle(self) -> None:
        """Called by an idle engine thread: sends what is queued, or a heartbeat when it is time."""
        if self._pending or time.monotonic() - self._last_sent >= HEARTBEAT_SECONDS:
            self._send(IDLE)

    def end(self, timeout: float = 10.0) -> None:
        """Tell the followers to shut down (once; not after a failure, when they may not listen)."""
        if not self._lock.acquire(timeout=timeout):  # the engine thread is stuck in a step
            log.error("tensor parallel: could not tell the other ranks to shut down (rank 0 is busy)")
            return
        try:
            if self._ended or self.broken:
                return
            self._ended = True
            self._broadcast(SHUTDOWN)
        except LockstepBroken:
            pass  # logged; rank 0 is stopping anyway
        finally:
            self._lock.release()

    def _send(self, command: str) -> None:
        with self._lock:
            if self._ended:
                raise self._break("the other ranks were already told to shut down")
            self._broadcast(command)

    def _broadcast(self, command: str) -> None:
        # The leader's counters ride along: a follower that applied the same calls has the same ones.
        message = (self._pending, command, dict(self._engine.stats))
        self._pending = []
        try:
            dist.broadcast_object_list([message], src=0, group=self._group)
        except Exception as e:  # noqa: BLE001
            raise self._break(f"broadcast to the other ranks failed: {type(e).__name__}: {e}") from e
        self._last_sent = time.monotonic()

    def _break(self, reason: str) -> LockstepBroken:
        if self.broken is None:
            self.broken = reason
            log.error("tensor parallel: %s; stopping the server", reason)
            if self._on_broken is not None:
                self._on_broken()
        return LockstepBroken(reason)


def follow(engine, group, rank: int) -> None:
    """A follower's loop: replay rank 0's calls and steps on ``engine`` until rank 0 says shut down.
    Raises (and so ends the rank with an error) when rank 0 is gone or the engines disagree."""
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"tensor-parallel rank {rank}: no message from rank 0 "
                               f"({type(e).__name__}: {e})") from None
        calls, command, leader_stats = box[0]
        for name, args in calls:
            getattr(engine, name)(*args)  # rank 0's engine took this call, so this one must
        if engine.stats != leader_stats:
            raise RuntimeError(f"tensor-parallel rank {rank} is out of step with rank 0: counters {engine.stats}, "
                               f"rank 0's {leader_stats}")
        if command == STEP:
            engine.step()
        elif command == SHUTDOWN:
            return
