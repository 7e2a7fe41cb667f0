"""The FastAPI app: its routes (the reference system's ``/generate`` API from ``native_api``, the
OpenAI API from ``openai_api``, operations here) over the shared state of ``state``.

Requests are validated here (pydantic types, then the engine's own checks) before anything is
queued, so a bad request gets a 400 with a message and changes nothing. Valid ones go to the engine
thread (``engine_loop``); concurrent clients are batched together by the engine's continuous batching.
Every response carries the reproducibility fingerprint in the ``X-Detcompile-Fingerprint`` header
(and in ``meta_info`` / ``system_fingerprint``), beside the seed each sample used.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import SamplingParams
from .protocol import AbortRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest
from .state import ApiError, JSON, Server, _ClosingStream, _error_body, _new_id, _sse, drain
from .native_api import GenState, _generate_events, _generate_items
from .openai_api import _chat_prompt, _check_model, _completion_prompts, _openai_params, _openai_run

log = logging.getLogger("detcompile.server")

MAX_BODY_BYTES = 32 << 20


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
            events = _generate_events(pending, states, n, request)
            return _ClosingStream(_sse(server, pending, "/generate(stream)", events), media_type="text/event-stream",
                                  headers=headers)
        if not await drain(server, pending, "/generate", states, request):
            return JSON({}, status_code=499)
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
        "tensor_parallel_size": getattr(e, "tensor_parallel_size", None),  # None: no TP
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
