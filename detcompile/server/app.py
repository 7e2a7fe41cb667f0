"""The FastAPI app: the reference system's ``/generate`` API, the OpenAI API, and operations.

Requests are validated here (pydantic types, then the engine's own checks) before anything is
queued, so a bad request gets a 400 with a message and changes nothing. Valid ones go to the engine
thread (``engine_loop``); concurrent clients are batched together by the engine's continuous batching.
Every response carries the reproducibility fingerprint in the ``X-Detcompile-Fingerprint`` header
(and in ``meta_info`` / ``system_fingerprint``), beside the seed each sample used.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, RequestOutput, SamplingParams
from .engine_loop import EngineLoop, Handle, Update
from .fingerprint import fingerprint as compute_fingerprint
from .protocol import AbortRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest, GenerateSamplingParams

log = logging.getLogger("detcompile.server")

#: The chat prompt of a tokenizer without a chat template: one "role: content" line per message,
#: then "assistant:" for the model to continue (documented in docs/server.md).
FALLBACK_CHAT_TEMPLATE = "{role}: {content}\n"
MAX_BODY_BYTES = 32 << 20


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
    """The state behind the app: the engine, its thread, the fingerprint and the counters."""

    def __init__(self, engine: Engine, *, model_name: str = "detcompile-demo", api_key: str | None = None,
                 max_queue: int = 1024, max_running: int | None = None):
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
        self.fingerprint, self.fingerprint_parts = compute_fingerprint(engine)
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


class TextStream:
    """Incremental text of one sample for streaming: holds back what could still become a stop
    string (cut from the final text) and unfinished multi-byte characters, so that the streamed
    pieces always add up to the final text."""

    def __init__(self, server: Server, params: SamplingParams):
        self.server, self.params = server, params
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # streamed so far

    def push(self, ids: list[int], final_text: str | None = None) -> str:
        self.ids.extend(ids)
        if final_text is not None:
            text, safe = final_text, len(final_text)
        else:
            text = self.server.decode(self.ids, self.params.skip_special_tokens)
            safe = len(text) - self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe <= len(self.text):
            return ""
        delta = text[len(self.text):safe]
        self.text = text[:safe]
        return delta


# -- responses of /generate ------------------------------------------------------------------------
def _finish_obj(reason: str | None, matched, n_out: int) -> dict | None:
    if reason is None:
        return None
    if reason == "stop":
        return {"type": "stop", "matched": matched}
    if reason == "length":
        return {"type": "length", "length": n_out}
    return {"type": "abort", "message": "request aborted"}


class GenState:
    """The cumulative state of one (prompt, sample) of a /generate request."""

    def __init__(self, server: Server, rid: str, prompt_ids: list[int], params: SamplingParams, sample: int,
                 req: GenerateRequest):
        self.server, self.rid, self.prompt_ids, self.params, self.sample, self.req = \
            server, rid, prompt_ids, params, sample, req
        self.text = TextStream(server, params)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list = []
        self.finish = None
        self.final: RequestOutput | None = None
        self.t0 = time.perf_counter()

    def apply(self, delta, final: RequestOutput | None) -> bool:
        """Take an update; True if anything changed."""
        changed = bool(delta.token_ids) or (final is not None and self.final is None)
        self.ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or [])
        self.tops.extend(delta.top_logprobs or [])
        final_text = None
        if final is not None:
            self.final = final
            out = final.outputs[self.sample]
            final_text = out.text if out.text is not None else ""
            self.finish = _finish_obj(out.finish_reason, delta.matched, len(out.token_ids))
        self.text.push(delta.token_ids, final_text)
        return changed

    def _lp_entry(self, lp, tid):
        return [lp, tid, self.server.token_text(tid) if self.req.return_text_in_logprobs else None]

    def to_json(self) -> dict:
        s, req = self.server, self.req
        meta = {
            "id": self.rid if self.params.n == 1 else f"{self.rid}-{self.sample}",
            "finish_reason": self.finish,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.ids),
            "cached_tokens": self.final.num_cached_tokens if self.final is not None else 0,
            "e2e_latency": round(time.perf_counter() - self.t0, 6),
            "sampling_seed": self.params.sample_seed(self.sample),
            "system_fingerprint": s.fingerprint,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [self._lp_entry(lp, t) for lp, t in zip(self.logprobs, self.ids)]
            if req.top_logprobs_num > 0:
                meta["output_top_logprobs"] = [[self._lp_entry(lp, t) for t, lp in top] for top in self.tops]
            if req.logprob_start_len >= 0:
                start = min(req.logprob_start_len, len(self.prompt_ids))
                plp = self.final.prompt_logprobs if self.final is not None else None
                ptop = self.final.prompt_top_logprobs if self.final is not None else None
                if plp is not None or start == len(self.prompt_ids):
                    meta["input_token_logprobs"] = [self._lp_entry(plp[p], self.prompt_ids[p])
                                                    for p in range(start, len(self.prompt_ids))]
                    if req.top_logprobs_num > 0:
                        meta["input_top_logprobs"] = [
                            None if ptop[p] is None else [self._lp_entry(lp, t) for t, lp in ptop[p]]
                            for p in range(start, len(self.prompt_ids))]
        return {"text": self.text.text, "output_ids": list(self.ids), "meta_info": meta}


# -- the app ---------------------------------------------------------------------------------------
def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="detcompile server", version=__import__("detcompile").__version__,
                  description="Bitwise deterministic LLM serving: the reference system's /generate API and "
                              "the OpenAI API. Same fingerprint + same request = same bits.",
                  lifespan=_lifespan(server))
    app.state.server = server
    app.add_middleware(_Edge, server=server)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status < 500 and exc.status != 503:
            server.counters["rejected_invalid"] += 1
        log.info("request rejected %s %s status=%d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSON(_error_body(exc.status, exc.message, exc.param, exc.kind), status_code=exc.status,
                    headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        server.counters["rejected_invalid"] += 1
        errs = exc.errors()
        parts, param = [], None
        for e in errs[:5]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if e.get("type") == "json_invalid":
                parts.append(f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
                continue
            where = ".".join(loc) or "body"
            param = param or where
            parts.append(f"{where}: {e.get('msg')}")
        msg = "; ".join(parts) or "invalid request"
        log.info("request rejected %s %s status=400: %s", request.method, request.url.path, msg)
        return JSON(_error_body(400, msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSON(_error_body(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404
                                else "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        server.counters["internal_errors"] += 1
        log.exception("unexpected error in %s", request.url.path)
        return JSON(_error_body(500, f"internal server error: {type(exc).__name__}", kind="server_error"),
                    status_code=500)

    # -- operations ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSON({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await asyncio.wrap_future(server.loop.call(lambda e: e.flush_cache()))
        return {"success": True, "message": "Cache flushed."}

    @app.post("/abort_request")
    async def abort_request(req: AbortRequest):
        """Abort a request by its id (``meta_info.id``, or the ``rid`` you gave), or all of them: its
        client gets what was generated so far with finish_reason ``{"type": "abort"}``."""
        if req.abort_all:
            server.loop.abort_all()
        elif req.rid:
            server.loop.abort(req.rid)
        else:
            raise ApiError(400, "give 'rid' or 'abort_all': true", "rid")
        return {"success": True}

    @app.get("/get_model_info")
    async def get_model_info():
        return _model_info(server)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "detcompile", "max_model_len": server.max_model_len}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_metrics_text(server), media_type="text/plain; version=0.0.4")

    # -- /generate ---------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        server.counters["http_requests"] += 1
        items, single, base = _generate_items(server, req)
        pending = server.start(items, req.stream)
        states = {(i, j): GenState(server, rid, ids, p, j, req)
                  for i, (rid, ids, p) in enumerate(items) for j in range(p.n)}
        n = items[0][2].n
        headers = {"X-Detcompile-Seed": str(items[0][2].effective_seed)} if single else None
        if req.stream:
            return _ClosingStream(_sse(server, pending, "/generate(stream)", _generate_events(pending, states, n, request)), media_type="text/event-stream",
                                  headers=headers)
        try:
            while not pending.done:
                u = await pending.next(request)
                for j, d in enumerate(u.samples):
                    states[(u.index, j)].apply(d, u.final)
        except ClientGone:
            server.counters["client_disconnects"] += 1
            pending.log_line("/generate", "client-disconnected")
            return JSON({}, status_code=499)
        finally:
            pending.close()
        pending.log_line("/generate", "ok")
        results = [states[k].to_json() for k in sorted(states)]
        return JSON(results[0] if single and n == 1 else results, headers=headers)

    # -- OpenAI ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.counters["http_requests"] += 1
        _check_model(server, req.model)
        prompts = _completion_prompts(server, req)
        items = []
        for i, ids in enumerate(prompts):
            p = _openai_params(server, req, len(ids), req.max_tokens, req.logprobs, f"prompt {i}")
            server.check_prompt(ids, p, f"prompt {i}" if len(prompts) > 1 else "prompt")
            items.append((_new_id("cmpl") + f"-{i}", ids, p))
        return await _openai_run(server, req, request, items, chat=False, prompts=prompts)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.counters["http_requests"] += 1
        _check_model(server, req.model)
        ids = _chat_prompt(server, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        p = _openai_params(server, req, len(ids), max_tokens, k, "request")
        server.check_prompt(ids, p, "messages")
        return await _openai_run(server, req, request, [(_new_id("chatcmpl"), ids, p)], chat=True, prompts=[ids])

    return app


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if not server.loop.alive:
            server.loop.start()
        yield
        server.loop.stop()

    return lifespan


class _Edge:
    """ASGI middleware: the API key check (every path but /health) and the fingerprint header."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.header = (b"x-detcompile-fingerprint", server.fingerprint.encode())
        self.expected = f"Bearer {server.api_key}".encode() if server.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + [self.header])
            await send(message)

        headers = dict(scope.get("headers") or [])
        if scope.get("method") == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # Every POST body here is JSON; read it as such whatever the client said (curl -d says form).
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            resp = JSON(_error_body(413, f"request body of {int(size)} bytes is over the limit of {MAX_BODY_BYTES}"),
                        status_code=413)
            return await resp(scope, receive, send_with_header)
        if self.expected is not None and scope["path"] != "/health":
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = JSON(_error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        kind="authentication_error"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_with_header)
        await self.app(scope, receive, send_with_header)


def _model_info(server: Server) -> dict:
    e = server.engine
    return {
        "model_path": server.model_name,
        "served_model_name": server.model_name,
        "tokenizer_path": None,
        "has_tokenizer": server.tokenizer is not None,
        "is_generation": True,
        "vocab_size": server.vocab_size,
        "max_model_len": server.max_model_len,
        "max_num_seqs": e.scheduler.max_num_seqs,
        "max_queue": server.max_queue,
        "eos_token_ids": sorted(e.eos_token_ids),
        "deterministic": bool(e.deterministic),
        "default_sampling_seed": SamplingParams().effective_seed,
        "system_fingerprint": server.fingerprint,
        "fingerprint_components": server.fingerprint_parts,
    }


def _metrics_text(server: Server) -> str:
    s = dict(server.loop.snapshot)
    q = s.get("queried_tokens", 0)
    rows = [
        ("requests_total", "counter", "engine requests accepted (one per prompt)", s.get("requests", 0)),
        ("requests_finished_total", "counter", "engine requests finished", s.get("finished", 0)),
        ("requests_aborted_total", "counter", "engine requests aborted (client disconnected)", s.get("aborted", 0)),
        ("http_requests_total", "counter", "generation HTTP requests received", server.counters["http_requests"]),
        ("requests_rejected_overload_total", "counter", "requests refused with 503 (queue full)",
         server.counters["rejected_overload"]),
        ("requests_rejected_invalid_total", "counter", "requests refused with a 4xx (invalid input)",
         server.counters["rejected_invalid"]),
        ("client_disconnects_total", "counter", "clients that left before their answer",
         server.counters["client_disconnects"]),
        ("prompt_tokens_total", "counter", "prompt tokens accepted", s.get("prompt_tokens", 0)),
        ("generation_tokens_total", "counter", "tokens generated", s.get("generated_tokens", 0)),
        ("engine_steps_total", "counter", "engine forward steps", s.get("steps", 0)),
        ("engine_failed_steps_total", "counter", "engine steps that raised", s.get("failed_steps", 0)),
        ("preemptions_total", "counter", "sequences preempted for KV space", s.get("preemptions", 0)),
        ("queue_length", "gauge", "sequences waiting for the engine", s.get("waiting", 0)),
        ("running_sequences", "gauge", "sequences in the running batch", s.get("running", 0)),
        ("inflight_sequences", "gauge", "sequences accepted and not finished", server.inflight),
        ("kv_cache_usage_ratio", "gauge", "fraction of KV pages held by sequences", s.get("kv_usage", 0.0)),
        ("kv_cache_blocks_used", "gauge", "KV pages held by sequences", s.get("kv_blocks_used", 0)),
        ("kv_cache_blocks_total", "gauge", "usable KV pages", s.get("kv_blocks_total", 0)),
        ("aborted_kv_blocks_freed_total", "counter", "KV pages released by aborted requests",
         s.get("aborted_kv_blocks_freed", 0)),
        ("prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
         s.get("hit_tokens", 0)),
        ("prefix_cache_queried_tokens_total", "counter", "prompt tokens looked up in the prefix cache", q),
        ("prefix_cache_hit_rate", "gauge", "hit tokens / queried tokens", s.get("hit_tokens", 0) / q if q else 0.0),
    ]
    lines = []
    for name, kind, doc, value in rows:
        lines += [f"# HELP detcompile_{name} {doc}", f"# TYPE detcompile_{name} {kind}", f"detcompile_{name} {value}"]
    lines += ["# HELP detcompile_info the served model and its reproducibility fingerprint",
              "# TYPE detcompile_info gauge",
              f'detcompile_info{{model="{server.model_name}",fingerprint="{server.fingerprint}",'
              f'deterministic="{str(bool(server.engine.deterministic)).lower()}"}} 1']
    return "\n".join(lines) + "\n"


# -- /generate helpers -------------------------------------------------------------------------------
_GEN_RENAMES = {"seed": "sampling_params.sampling_seed", "logprobs": "top_logprobs_num",
                "prompt_logprobs": "top_logprobs_num"}


def _generate_items(server: Server, req: GenerateRequest):
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "give exactly one of 'text' and 'input_ids'", "text")
    if req.text is not None:
        single = isinstance(req.text, str)
        texts = [req.text] if single else req.text
        if not texts:
            raise ApiError(400, "'text' is an empty list: nothing to generate", "text")
        if any(t == "" for t in texts):
            raise ApiError(400, "'text' holds an empty prompt", "text")
        prompts = [server.tokenize(t) for t in texts]
    else:
        ids = req.input_ids
        if not ids:
            raise ApiError(400, "'input_ids' is empty: nothing to generate", "input_ids")
        single = isinstance(ids[0], int)
        prompts = [list(ids)] if single else [list(x) for x in ids]
    if req.logprob_start_len < -1:
        raise ApiError(400, f"logprob_start_len must be -1 (output logprobs only) or >= 0, got {req.logprob_start_len}",
                       "logprob_start_len")
    sps = req.sampling_params if req.sampling_params is not None else GenerateSamplingParams()
    if isinstance(sps, list):
        if len(sps) != len(prompts):
            raise ApiError(400, f"{len(sps)} sampling_params for {len(prompts)} prompts", "sampling_params")
    else:
        sps = [sps] * len(prompts)
    rids = req.rid if req.rid is not None else None
    if rids is not None:
        rids = [rids] if isinstance(rids, str) else rids
        if len(rids) != len(prompts) or len(set(rids)) != len(rids):
            raise ApiError(400, "'rid' needs one distinct id per prompt", "rid")
    base = _new_id("gen")
    items = []
    for i, (ids, sp) in enumerate(zip(prompts, sps)):
        want_prompt = req.return_logprob and 0 <= req.logprob_start_len < len(ids)
        k = req.top_logprobs_num
        p = server.make_params(
            "sampling_params", _GEN_RENAMES,
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
            repetition_penalty=sp.repetition_penalty, seed=sp.sampling_seed, max_new_tokens=sp.max_new_tokens,
            min_new_tokens=sp.min_new_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
            skip_special_tokens=sp.skip_special_tokens, logprobs=k if req.return_logprob else None,
            prompt_logprobs=k if want_prompt else None)
        server.check_prompt(ids, p, f"prompt {i}" if len(prompts) > 1 else "prompt")
        rid = rids[i] if rids is not None else (base if single else f"{base}-{i}")
        items.append((rid, ids, p))
    return items, single, base


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


async def _generate_events(pending: Pending, states: dict, n: int, request: Request):
    while not pending.done:
        u = await pending.next(request)
        for j, d in enumerate(u.samples):
            st = states[(u.index, j)]
            if st.apply(d, u.final):
                chunk = st.to_json()
                chunk["index"] = u.index * n + j
                yield f"data: {_dumps(chunk)}\n\n"


# -- OpenAI helpers ----------------------------------------------------------------------------------
_OAI_RENAMES = {"seed": "seed", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                "logprobs": "logprobs", "n": "n"}


def _check_model(server: Server, model: str) -> None:
    if model != server.model_name:
        raise ApiError(400, f"unknown model {model!r}: this server serves {server.model_name!r} (GET /v1/models)",
                       "model", kind="model_not_found")


def _completion_prompts(server: Server, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        texts = [p]
    elif not p:
        raise ApiError(400, "'prompt' is empty: nothing to complete", "prompt")
    elif isinstance(p[0], int):
        return [list(p)]
    elif isinstance(p[0], str):
        texts = p
    else:
        if any(not x for x in p):
            raise ApiError(400, "'prompt' holds an empty token list", "prompt")
        return [list(x) for x in p]
    if any(t == "" for t in texts):
        raise ApiError(400, "'prompt' holds an empty string", "prompt")
    return [server.tokenize(t) for t in texts]


def _chat_prompt(server: Server, req: ChatCompletionRequest) -> list[int]:
    if not req.messages:
        raise ApiError(400, "'messages' is empty", "messages")
    msgs = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        msgs.append({"role": m.role, "content": content or ""})
    if server.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: use /v1/completions or /generate with token ids")
    if getattr(server.tokenizer, "chat_template", None):
        try:
            text = server.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001  (a template may refuse a role order)
            raise ApiError(400, f"the model's chat template refused the messages: {e}", "messages") from None
        return server.tokenize(text, add_special_tokens=False)
    text = "".join(FALLBACK_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in msgs) + "assistant:"
    return server.tokenize(text)


def _openai_params(server: Server, req, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                   what: str) -> SamplingParams:
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    if getattr(req, "suffix", None) is not None:
        raise ApiError(400, "suffix is not supported", "suffix")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise ApiError(400, "best_of must equal n (every sample is returned)", "best_of")
    if getattr(req, "echo", False) and logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported", "echo")
    room = server.max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = max(room, 1)
    elif isinstance(max_tokens, int) and max_tokens > 0 and prompt_len < server.max_model_len and max_tokens > room:
        raise ApiError(400, f"this model's maximum context length is {server.max_model_len} tokens; the prompt has "
                            f"{prompt_len} and max_tokens asks for {max_tokens} more (at most {room})", "max_tokens")
    return server.make_params(
        what, _OAI_RENAMES, n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, max_new_tokens=max_tokens,
        min_new_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens, logprobs=logprobs)


def _oai_finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason, reason) if reason else None


class OAIChoice:
    def __init__(self, server: Server, index: int, params: SamplingParams, sample: int, chat: bool, k: int | None,
                 echo_text: str = ""):
        self.server, self.index, self.params, self.sample, self.chat, self.k = server, index, params, sample, chat, k
        self.text = TextStream(server, params)
        self.echo = echo_text
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list = []
        self.finish = None
        self.offset = len(echo_text)

    def apply(self, delta, final: RequestOutput | None) -> tuple[str, list, list, list]:
        new = list(delta.token_ids)
        lps, tops = list(delta.logprobs or []), list(delta.top_logprobs or [])
        self.ids += new
        self.lps += lps
        self.tops += tops
        final_text = None
        if final is not None:
            out = final.outputs[self.sample]
            final_text = out.text if out.text is not None else ""
            self.finish = _oai_finish(out.finish_reason)
        return self.text.push(new, final_text), new, lps, tops

    def logprobs_json(self, ids, lps, tops):
        if self.k is None:
            return None
        tt = self.server.token_text
        if self.chat:
            def entry(t, lp):
                s = tt(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            content = []
            for i, (t, lp) in enumerate(zip(ids, lps)):
                e = entry(t, lp)
                e["top_logprobs"] = [entry(a, b) for a, b in tops[i]] if self.k and i < len(tops) else []
                content.append(e)
            return {"content": content}
        toks = [tt(t) for t in ids]
        offsets = []
        for s in toks:
            offsets.append(self.offset)
            self.offset += len(s)
        top = [{tt(a): b for a, b in tops[i]} if self.k and i < len(tops) else None for i in range(len(ids))]
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top if self.k else None, "text_offset": offsets}


async def _openai_run(server: Server, req, request: Request, items, *, chat: bool, prompts):
    pending = server.start(items, req.stream)
    created = int(time.time())
    k = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)
    echo = [server.decode(ids) if getattr(req, "echo", False) else "" for ids in prompts]
    n = req.n
    choices = {(i, j): OAIChoice(server, i * n + j, p, j, chat, k, echo[i])
               for i, (_, _, p) in enumerate(items) for j in range(p.n)}
    rid = items[0][0]
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": server.model_name, "system_fingerprint": server.fingerprint}
    seeds = {c.index: c.params.sample_seed(c.sample) for c in choices.values()}
    headers = {"X-Detcompile-Seed": str(items[0][2].effective_seed)}
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"

    def usage():
        pt = sum(len(ids) for _, ids, _ in items)
        ct = sum(len(c.ids) for c in choices.values())
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            obj = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                for c in sorted(choices.values(), key=lambda c: c.index):
                    first = dict(base, object=obj, choices=[{"index": c.index, "delta": {"role": "assistant",
                                 "content": ""}, "logprobs": None, "finish_reason": None}])
                    yield f"data: {_dumps(first)}\n\n"
            elif any(echo):
                for c in sorted(choices.values(), key=lambda c: c.index):
                    yield f"data: {_dumps(dict(base, object=obj, choices=[{'index': c.index, 'text': c.echo, 'logprobs': None, 'finish_reason': None}]))}\n\n"  # noqa: E501
            while not pending.done:
                u = await pending.next(request)
                for j, d in enumerate(u.samples):
                    c = choices[(u.index, j)]
                    text, ids, lps, tops = c.apply(d, u.final)
                    if not (text or ids or c.finish):
                        continue
                    ch = {"index": c.index, "logprobs": c.logprobs_json(ids, lps, tops),
                          "finish_reason": c.finish, "seed": seeds[c.index]}
                    if chat:
                        ch["delta"] = {"content": text} if text or not c.finish else {}
                    else:
                        ch["text"] = text
                    yield f"data: {_dumps(dict(base, object=obj, choices=[ch]))}\n\n"
            if include_usage:
                yield f"data: {_dumps(dict(base, object=obj, choices=[], usage=usage()))}\n\n"

        return _ClosingStream(_sse(server, pending, endpoint + "(stream)", events()), media_type="text/event-stream",
                              headers=headers)

    try:
        while not pending.done:
            u = await pending.next(request)
            for j, d in enumerate(u.samples):
                choices[(u.index, j)].apply(d, u.final)
    except ClientGone:
        server.counters["client_disconnects"] += 1
        pending.log_line(endpoint, "client-disconnected")
        return JSON({}, status_code=499)
    finally:
        pending.close()
    pending.log_line(endpoint, "ok")
    out = []
    for c in sorted(choices.values(), key=lambda c: c.index):
        c.offset = len(c.echo)
        ch = {"index": c.index, "logprobs": c.logprobs_json(c.ids, c.lps, c.tops), "finish_reason": c.finish,
              "seed": seeds[c.index]}
        if chat:
            ch["message"] = {"role": "assistant", "content": c.text.text}
        else:
            ch["text"] = c.echo + c.text.text
        out.append(ch)
    return JSON(dict(base, choices=out, usage=usage()), headers=headers)

