"""What the routes share: the ``Server`` (engine thread, admission, checks, counters), requests in
flight (``Pending``), API errors, JSON and server-sent-event responses."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine import Engine, RequestOutput, SamplingParams
from .engine_loop import EngineLoop, Handle, Update
from .fingerprint import fingerprint as compute_fingerprint

log = logging.getLogger("detcompile.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.kind = status, message, param, headers, kind


class ClientGone(Exception):
    pass


def _error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class JSON(JSONResponse):
    """JSON without a failure on non-finite floats (a logprob can be -inf): they are written as
    ``-Infinity`` / ``NaN``, which Python's json and JavaScript's JSON5-style parsers read."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode("utf-8")


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True, separators=(",", ":"))


class _ClosingStream(StreamingResponse):
    """Closes its body generator however the stream ends (client gone included), so the
    generator's cleanup (aborting its engine requests) runs at once, not at garbage collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class Server:
    """The state behind the app: the engine, its thread, the fingerprint and the counters.
    ``model_digests``: ``fingerprint.model_digests`` of the whole model, for a tensor-parallel engine
    (whose model is a shard)."""

    def __init__(self, engine: Engine, *, model_name: str = "detcompile-demo", api_key: str | None = None,
                 max_queue: int = 1024, max_running: int | None = None, model_digests: dict | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key or None
        self.max_running = max_running or engine.scheduler.max_num_seqs
        self.capacity = self.max_running + max_queue  # sequences accepted at once (running + queued)
        self.max_queue = max_queue
        # The engine thread decodes with the engine's tokenizer; the event loop with this copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self.vocab_size = engine.vocab_size
        self.max_model_len = engine.max_model_len
        self.fingerprint, self.fingerprint_parts = compute_fingerprint(engine, model_digests)
        self.loop = EngineLoop(engine)
        self.inflight = 0  # sequences accepted and not finished (event-loop thread only)
        self.counters = {"http_requests": 0, "rejected_overload": 0, "rejected_invalid": 0, "client_disconnects": 0,
                         "internal_errors": 0}
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids (input_ids, or a list of ints as prompt)")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, tid: int) -> str:
        """One token as text (for logprobs); ``token_id:N`` where it decodes to nothing."""
        s = self._token_text.get(tid)
        if s is None:
            s = self.decode([tid], skip_special_tokens=False) or f"token_id:{tid}"
            self._token_text[tid] = s
        return s

    # -- requests ------------------------------------------------------------------------------
    def make_params(self, what: str, renames: dict[str, str], **kw) -> SamplingParams:
        try:
            return SamplingParams(**kw).validate(self.vocab_size)
        except ValueError as e:
            msg = str(e)
            for ours, theirs in renames.items():
                msg = msg.replace(f"SamplingParams.{ours} ", f"{theirs} ")
            raise ApiError(400, f"{what}: {msg.replace('SamplingParams.', '')}") from None

    def check_prompt(self, ids: list[int], params: SamplingParams, what: str) -> None:
        try:
            self.engine._check(ids, params)  # read-only: vocabulary, context length, params
        except ValueError as e:
            raise ApiError(400, f"{what}: {e}") from None

    def admit(self, n_seqs: int) -> None:
        if n_seqs > self.capacity:
            raise ApiError(400, f"the request asks for {n_seqs} sequences (prompts x n); this server takes at most "
                                f"{self.capacity} at once (--max-num-seqs + --max-queue)", "n")
        if self.inflight + n_seqs > self.capacity:
            self.counters["rejected_overload"] += 1
            raise ApiError(503, f"server overloaded: {self.inflight} sequences in flight, queue bound "
                                f"{self.capacity}; retry later", headers={"Retry-After": "1"}, kind="overloaded")

    def start(self, items: list[tuple[str, list[int], SamplingParams]], stream: bool) -> "Pending":
        """Queue (request id, prompt ids, params) items as one batch; returns their Pending."""
        n = sum(p.n for _, _, p in items)
        self.admit(n)
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        handles = [Handle(rid, ids, p, i, stream, sink, loop) for i, (rid, ids, p) in enumerate(items)]
        self.inflight += n
        self.loop.submit(handles)
        return Pending(self, handles, sink, n)


class Pending:
    """One HTTP request's engine requests: their updates, in arrival order; aborts what is left."""

    def __init__(self, server: Server, handles: list[Handle], sink: asyncio.Queue, n_seqs: int):
        self.server, self.handles, self.sink, self.n_seqs = server, handles, sink, n_seqs
        self.finals: dict[int, RequestOutput] = {}
        self.t0 = time.perf_counter()
        self._get: asyncio.Future | None = None
        self._closed = False

    @property
    def done(self) -> bool:
        return len(self.finals) == len(self.handles)

    async def next(self, request: Request | None) -> Update:
        """The next update; raises ClientGone when the client has disconnected meanwhile."""
        while True:
            if self._get is None:
                self._get = asyncio.ensure_future(self.sink.get())
            done, _ = await asyncio.wait({self._get}, timeout=0.5)
            if done:
                update, self._get = self._get.result(), None
                if update.error is not None:
                    self.close()
                    raise ApiError(update.error_status, update.error, kind="invalid_request_error"
                                   if update.error_status < 500 else "server_error")
                if update.final is not None:
                    self.finals[update.index] = update.final
                return update
            if request is not None and await request.is_disconnected():
                raise ClientGone()

    def close(self) -> None:
        """Abort the unfinished engine requests and give back the admission slots (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._get is not None:
            self._get.cancel()
        for h in self.handles:
            if h.index not in self.finals:
                self.server.loop.abort(h.rid)
        self.server.inflight -= self.n_seqs

    def log_line(self, endpoint: str, status: str) -> None:
        outs = list(self.finals.values())
        prompt = sum(len(h.prompt_ids) for h in self.handles)
        gen = sum(len(o.token_ids) for out in outs for o in out.outputs)
        cached = sum(out.num_cached_tokens for out in outs)
        rid = self.handles[0].rid if len(self.handles) == 1 else f"{self.handles[0].rid}..(x{len(self.handles)})"
        log.info("request %s %s prompts=%d prompt_tokens=%d cached_tokens=%d output_tokens=%d latency=%.3fs status=%s",
                 rid, endpoint, len(self.handles), prompt, cached, gen, time.perf_counter() - self.t0, status)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


async def _sse(server: Server, pending: Pending, label: str, events):
    """Pass a stream's ``data:`` lines through, then ``[DONE]``. An API error becomes one error
    event; a client that leaves is counted (its request is aborted when ``pending`` closes); the
    request's log line is written once, whatever happened."""
    status = "ok"
    try:
        async for line in events:
            yield line
        yield "data: [DONE]\n\n"
    except ClientGone:
        status = "client-disconnected"
        server.counters["client_disconnects"] += 1
    except ApiError as e:
        status = f"error {e.status}"
        yield f"data: {_dumps(_error_body(e.status, e.message, e.param, e.kind))}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "client-disconnected"
        server.counters["client_disconnects"] += 1
        raise
    finally:
        pending.close()
        pending.log_line(label, status)


async def drain(server: Server, pending: Pending, label: str, states: dict, request) -> bool:
    """A non-streamed request: feed every update to ``states[(index, sample)].apply`` until done.
    False if the client left (counted, logged); the request's log line is written either way."""
    try:
        while not pending.done:
            u = await pending.next(request)
            for j, d in enumerate(u.samples):
                states[(u.index, j)].apply(d, u.final)
    except ClientGone:
        server.counters["client_disconnects"] += 1
        pending.log_line(label, "client-disconnected")
        return False
    finally:
        pending.close()
    pending.log_line(label, "ok")
    return True
