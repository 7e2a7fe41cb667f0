"""The OpenAI API, ``/v1/completions`` and ``/v1/chat/completions``: prompts, parameters, choices and
the shared run (plain or streamed)."""
from __future__ import annotations

import time

from fastapi import Request

from ..engine import RequestOutput, SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import ApiError, JSON, Server, _ClosingStream, _dumps, _sse, drain
from .native_api import TextStream

#: The chat prompt of a tokenizer without a chat template: one "role: content" line per message,
#: then "assistant:" for the model to continue (documented in docs/server.md).
FALLBACK_CHAT_TEMPLATE = "{role}: {content}\n"


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

    if not await drain(server, pending, endpoint, choices, request):
        return JSON({}, status_code=499)
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
