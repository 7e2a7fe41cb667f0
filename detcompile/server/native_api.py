"""The reference system's native API, ``POST /generate``: request items, per-sample text and
logprob state, and the stream's events."""
from __future__ import annotations

import time

from fastapi import Request

from ..engine import RequestOutput, SamplingParams
from .protocol import GenerateRequest, GenerateSamplingParams
from .state import ApiError, Pending, Server, _dumps, _new_id



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
