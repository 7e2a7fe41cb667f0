"""``Engine``: the public face of the serving engine (generate, score, step-wise serving).

Every token, logprob and sample is a function of (model, prompt, sampling parameters, seed) alone:
not of the batch, the arrival order, the chunking, the prefix cache, CUDA graphs or the process.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from . import attention_backends
from .block_manager import BlockManager
from .model_runner import ModelRunner, kv_geometry
from .sampler import SamplingBatch, _to_device, allowed_mask, process_logits, sample, token_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler, Work
from .sequence import Sequence, Status


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None  # per generated token (None unless SamplingParams.logprobs is set)
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # "stop" (EOS, stop token or string), "length", "abort"
    seed: int
    logits: list | None = None  # keep_logits: per step, the raw logits row [V] (float32, CPU)
    scores: list | None = None  # keep_logits: per step, the processed row the sampler chose from


@dataclass
class RequestOutput:
    """A request's result: ``outputs`` holds its n samples; the first one's fields are mirrored."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[float | None] | None = None  # per prompt token (None for the first)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs

    @property
    def top_logprobs(self):
        return self.outputs[0].top_logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class Engine:
    """A paged-KV continuous-batching engine over a Hugging Face causal LM.

    ``model_or_path``: a transformers model object or a local checkpoint directory (loaded with
    transformers; nothing is downloaded). ``deterministic=False`` runs the same engine with the
    stock kernels (fast, not batch-invariant): the baseline that prices determinism.
    ``attention_backend``: "triton" (default, detcompile's kernel), "fa3" or "flashinfer" (optional
    extras, see ``engine.attention_backends``); each is bitwise stable within itself.
    ``tensor_parallel_size``: None (default) runs the whole model here. N runs this process's rank of N
    (one process per rank in an initialized default process group, each engine given the same
    requests; Llama-style models, CPU-tested so far). The model is sharded in place. Every N, 1
    included, gives the same bits, which differ from no TP (docs/tensor_parallel.md).
    ``block_size`` (tokens per KV page) defaults to the backend's: 16, or FA3's key tile (128 at
    head dims 64 and 128).

    ``close()`` (or ``with Engine(...) as engine:``) frees the KV cache and CUDA graphs at once;
    dropping the last reference to the engine frees them too.
    """

    closed = False

    def __init__(self, model_or_path, *, tokenizer=None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, max_num_seqs: int = 256, max_model_len: int | None = None,
                 kv_cache_fraction: float = 0.85, kv_cache_bytes: int | None = None, block_size: int | None = None,
                 chunked_prefill_size: int = 2048, enable_prefix_caching: bool = True, cuda_graphs: bool = True,
                 deterministic: bool = True, attention_backend: str = attention_backends.DEFAULT,
                 tensor_parallel_size: int | None = None, log=None):
        self.log = log if log is not None else (lambda msg: print(msg, flush=True))
        t0 = time.perf_counter()
        attention_backends.check_name(attention_backend)
        model, tokenizer = _load(model_or_path, tokenizer, dtype, device)
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size is not None:
            # One process per rank, each running this engine on the same requests in lockstep (its
            # scheduler decides alike); the model is sharded in place. Any TP size, 1 included, gives
            # the same bits (detcompile/tp; docs/tensor_parallel.md); no TP at all keeps today's.
            if not deterministic:
                raise ValueError("tensor_parallel_size needs deterministic=True (the TP-invariant reduction)")
            from ..tp import shard_for_engine

            self.tensor_parallel_rank = shard_for_engine(model, tensor_parallel_size)
        if block_size is None:  # FA3's page is its key tile, which depends on the head dim
            block_size = attention_backends.default_block_size(
                attention_backend, kv_geometry(model)[2] if attention_backend == "fa3" else 0)
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = model.get_output_embeddings()
        self.vocab_size = int(cfg.vocab_size) if head is None else int(
            getattr(head, "vocab_size", None) or head.weight.shape[0])  # (a TP head holds a slice of the vocabulary)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 8192
        self.max_model_len = int(max_model_len or min(limit, 8192))
        if max_model_len and max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1]; got {kv_cache_fraction}")
        if max_num_seqs < 1 or chunked_prefill_size < 1 or block_size < 1:
            raise ValueError("max_num_seqs, chunked_prefill_size and block_size must be >= 1")
        self.deterministic = deterministic
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.runner = ModelRunner(
            model, block_size=block_size, max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(chunked_prefill_size, 1), deterministic=deterministic,
            cuda_graphs=cuda_graphs, kv_cache_fraction=kv_cache_fraction, kv_cache_bytes=kv_cache_bytes,
            attention_backend=attention_backend, log=self.log)
        self.blocks = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, chunked_prefill_size)
        self.requests: dict[str, list[Sequence]] = {}
        self._next_id = 0
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "aborted": 0}
        self.startup_seconds = time.perf_counter() - t0
        self.log(f"detcompile engine ready in {self.startup_seconds:.1f} s (compile/warm-up "
                 f"{self.runner.compile_seconds:.1f} s, CUDA graphs {self.runner.graph_seconds:.1f} s), "
                 f"{'deterministic' if deterministic else 'stock kernels (NOT deterministic)'}")

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engine's device memory now (KV cache, CUDA graphs and their pool, the compiled
        forward; the weights too when the engine loaded the model itself), whoever still holds the
        engine or its runner. Unfinished requests are dropped. Idempotent; afterwards requests and
        steps raise RuntimeError. The model is left as it was given (the engine patches nothing on it:
        each step switches the attention implementation and switches it back)."""
        if self.closed:
            return
        self.closed = True
        runner, self.runner = self.runner, None
        self.scheduler = self.blocks = self.model = None
        self.requests = {}
        runner.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("detcompile engine: this Engine was closed (close() freed its KV cache and CUDA "
                               "graphs); build a new Engine")

    # -- requests ------------------------------------------------------------------------------
    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer: pass token ids or tokenizer=")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids (ints)")
        return list(prompt)

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty: it needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, so at most "
                             f"{self.max_model_len - 1} prompt tokens leave room for one generated token")
        params.validate(self.vocab_size)

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    keep_logits: bool = False) -> str:
        """Queue a request (validated first: a bad one raises ValueError and changes nothing).
        ``keep_logits`` keeps each step's raw and processed logits rows (HF's output_logits /
        output_scores); they cost a vocabulary-sized row per token."""
        self._check_open()
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        self._check(ids, params)
        rid = request_id if request_id is not None else f"req-{self._next_id}"
        self._next_id += 1
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seqs = [Sequence(list(ids), params, params.sample_seed(i), request_id=rid, sample_index=i,
                         keep_logits=keep_logits) for i in range(params.n)]
        self.requests[rid] = seqs
        for s in seqs:
            self.scheduler.add(s)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request and free its pages (a disconnected client)."""
        self._check_open()
        for s in self.requests.get(request_id, []):
            if not s.finished:
                self.scheduler.abort(s)
                s.status, s.finish_reason = Status.FINISHED, "abort"
        self.stats["aborted"] += 1

    def has_unfinished(self) -> bool:
        self._check_open()
        return self.scheduler.has_work()

    def flush_cache(self) -> None:
        """Forget the prefix cache (outputs do not change: cached and computed K/V are the same bits)."""
        self._check_open()
        self.blocks.flush()

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one forward over the scheduled work; returns the sequences that changed."""
        self._check_open()
        work = self.scheduler.schedule()
        if not work:
            return []
        keep_rows, prompt_rows = [], []
        for w in work:
            seq, rows = w.seq, []
            if seq.wants_prompt_logprobs:
                lo = max(w.start, seq.first_logit_pos)
                hi = min(w.end, len(seq.prompt) - 1)
                rows.extend(range(lo - w.start, hi - w.start))
            n_prompt_rows = len(rows)
            if w.samples:
                rows.append(w.length - 1)
            keep_rows.append(rows)
            prompt_rows.append(n_prompt_rows)
        logits = self.runner.run(work, keep_rows)  # always: the forward writes the chunk's K/V
        self.scheduler.postprocess(work)
        self.stats["steps"] += 1
        # Split the logits rows: prompt-logprob rows, then the sampling rows.
        at, sample_work, sample_rows, plp = 0, [], [], []
        for w, rows, np_ in zip(work, keep_rows, prompt_rows):
            if np_:
                plp.append((w, rows[:np_], at))
            at += np_
            if w.samples:
                sample_work.append(w)
                sample_rows.append(at)
                at += 1
        for w, rows, first in plp:
            self._record_prompt_logprobs(w, rows, logits[first:first + len(rows)])
        if sample_work:
            if sample_rows[-1] - sample_rows[0] == len(sample_rows) - 1:  # ascending: one slice, no upload
                rows = logits[sample_rows[0]:sample_rows[-1] + 1]
            else:
                rows = logits[_to_device(torch.tensor(sample_rows), logits.device)]
            self._sample(sample_work, rows)
        for w in work:
            if w.seq.score_only and w.end == len(w.seq):
                self.scheduler.finish(w.seq)
                w.seq.finish_reason = "score"
        return [w.seq for w in work]

    def _banned(self, seq: Sequence, num_output: int) -> list[int]:
        """Tokens that would end ``seq`` before its ``min_new_tokens``: masked while it is short."""
        p = seq.params
        if num_output >= p.min_new_tokens:
            return []
        return sorted(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else self.eos_token_ids))

    def _record_prompt_logprobs(self, w: Work, rows: list[int], logits: torch.Tensor) -> None:
        seq = w.seq
        positions = [w.start + r for r in rows]
        targets = torch.tensor([seq.prompt[p + 1] for p in positions], device=logits.device)
        k = 0 if seq.score_only else (seq.params.prompt_logprobs or 0)
        batch = None
        if seq.score_only and seq.params.logprobs_mode == "processed":
            # Replay the state generation had at each scored token: its output so far, its position.
            out = [seq.prompt[seq.score_from:p + 1] for p in positions]
            batch = SamplingBatch.from_params(
                [seq.params] * len(positions), [p + 1 for p in positions], seeds=[0] * len(positions),
                prompt_ids=[seq.prompt[:seq.score_from]] * len(positions), output_ids=out,
                banned_ids=[self._banned(seq, len(o)) for o in out], device=logits.device)
        res = token_logprobs(logits, targets, k, batch)
        lps = res.logprobs.tolist()
        tops = _tops(res, [k] * len(positions))
        for i, p in enumerate(positions):
            seq.prompt_logprobs_by_pos[p + 1] = (lps[i], tops[i])

    def _sample(self, work: list[Work], logits: torch.Tensor) -> None:
        seqs = [w.seq for w in work]
        batch = SamplingBatch.from_params(
            [s.params for s in seqs], [len(s) for s in seqs], seeds=[s.seed for s in seqs],
            prompt_ids=[s.prompt for s in seqs], output_ids=[s.output for s in seqs],
            banned_ids=[self._banned(s, len(s.output)) for s in seqs], device=logits.device)
        res = sample(logits, batch)
        if any(s.keep_logits for s in seqs):
            self._keep_logits(seqs, logits, batch)
        tokens, lps = res.token_ids.tolist(), res.logprobs.tolist()
        tops = _tops(res, [s.params.logprobs or 0 for s in seqs])
        for seq, tok, lp, top in zip(seqs, tokens, lps, tops):
            seq.output.append(tok)
            self.stats["generated_tokens"] += 1
            if seq.params.logprobs is not None:
                seq.logprobs.append(lp)
                if seq.params.logprobs:
                    seq.top_logprobs.append(top)
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)

    @staticmethod
    def _keep_logits(seqs: list[Sequence], logits: torch.Tensor, batch: SamplingBatch) -> None:
        raw, z = process_logits(logits, batch)
        if batch.use_filters:  # what top-k / top-p / min-p left to sample from; -inf elsewhere
            z = torch.where(allowed_mask(z, batch) | (batch.temperature[:, None] == 0), z, float("-inf"))
        for i, seq in enumerate(seqs):
            if seq.keep_logits:
                seq.step_logits.append(raw[i].cpu())
                seq.step_scores.append(z[i].cpu())

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        n = len(seq.output)
        if n >= p.min_new_tokens:
            if (not p.ignore_eos and tok in self.eos_token_ids) or tok in (p.stop_token_ids or ()):
                return "stop"
            if p.stop and self.tokenizer is not None and self._hit_stop_string(seq):
                return "stop"
        if n >= p.max_new_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        stops = [seq.params.stop] if isinstance(seq.params.stop, str) else list(seq.params.stop)
        text = self.tokenizer.decode(seq.output, skip_special_tokens=seq.params.skip_special_tokens)
        for s in stops:
            i = text.find(s, max(0, len(seq.text) - len(s)))
            if i >= 0:
                seq.text = text[:i]
                seq.stopped_by_string = True
                return True
        seq.text = text
        return False

    # -- results -------------------------------------------------------------------------------
    def _output(self, rid: str) -> RequestOutput:
        seqs = self.requests[rid]
        outs = []
        for s in seqs:
            if s.params.stop and getattr(s, "stopped_by_string", False):
                text = s.text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(s.output, skip_special_tokens=s.params.skip_special_tokens)
            else:
                text = None
            want = s.params.logprobs is not None
            outs.append(CompletionOutput(s.sample_index, list(s.output), text, list(s.logprobs) if want else None,
                                         list(s.top_logprobs) if want and s.params.logprobs else None,
                                         s.finish_reason, s.seed, s.step_logits if s.keep_logits else None,
                                         s.step_scores if s.keep_logits else None))
        first = seqs[0]
        plp = ptop = None
        if first.params.prompt_logprobs is not None:
            plp = [None] + [first.prompt_logprobs_by_pos[p][0] for p in range(1, len(first.prompt))]
            ptop = [None] + [first.prompt_logprobs_by_pos[p][1] for p in range(1, len(first.prompt))]
        return RequestOutput(rid, list(first.prompt), outs, plp, ptop, first.num_cached_prompt)

    def pop_output(self, rid: str) -> RequestOutput:
        self._check_open()
        out = self._output(rid)
        if out.finished:
            del self.requests[rid]
        return out

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, keep_logits: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); outputs in input order."""
        self._check_open()
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(plist)
        if len(params) != len(plist):
            raise ValueError(f"got {len(params)} SamplingParams for {len(plist)} prompts")
        # Validate everything first, so a bad prompt loses nothing already queued.
        checked = []
        for i, (p, sp) in enumerate(zip(plist, params)):
            try:
                ids = self._tokenize(p)
                self._check(ids, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            checked.append((ids, sp))
        rids = [self.add_request(ids, sp, keep_logits=keep_logits) for ids, sp in checked]
        self._run_until_done(rids, use_tqdm, "generate")
        outs = [self.pop_output(r) for r in rids]
        return outs[0:1] if single else outs

    def _run_until_done(self, rids: list[str], use_tqdm: bool, what: str) -> None:
        total = sum(len(self.requests[r]) for r in rids)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=f"detcompile {what}", unit="seq", leave=False)
        done = 0
        while any(not s.finished for r in rids for s in self.requests[r]):
            self.step()
            if bar is not None:
                now = sum(s.finished for r in rids for s in self.requests[r])
                bar.update(now - done)
                done = now
        if bar is not None:
            bar.close()

    def score(self, prompt, completion=None, params: SamplingParams | None = None, *, use_tqdm: bool = False):
        """Per-token logprobs of ``completion`` after ``prompt`` (lists of token ids, or lists of such
        lists): bitwise the logprobs ``generate`` reports for the same tokens with the same params."""
        self._check_open()
        batched = isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple, str))
        prompts = list(prompt) if batched else [prompt]
        completions = list(completion) if batched else [completion]
        params = params or SamplingParams(logprobs=0)
        rids = []
        for p, c in zip(prompts, completions):
            pids, cids = self._tokenize(p), self._tokenize(c)
            if not cids:
                raise ValueError("completion is empty: nothing to score")
            ids = pids + cids
            self._check(pids, params)
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompt + completion has {len(ids)} tokens; max_model_len is {self.max_model_len}")
            bad = [t for t in cids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"completion token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            rid = f"score-{self._next_id}"
            self._next_id += 1
            seq = Sequence(ids, params, 0, request_id=rid, score_only=True, score_from=len(pids))
            self.requests[rid] = [seq]
            self.scheduler.add(seq)
            rids.append(rid)
        self._run_until_done(rids, use_tqdm, "score")
        result = []
        for rid in rids:
            seq = self.requests.pop(rid)[0]
            result.append([seq.prompt_logprobs_by_pos[p][0] for p in range(seq.score_from, len(seq.prompt))])
        return result if batched else result[0]


def _tops(res, ks: list[int]) -> list[list[tuple[int, float]] | None]:
    """Per row, its first k (token id, logprob) alternatives (None where k is 0)."""
    if res.top_ids is None:
        return [None] * len(ks)
    ids, lps = res.top_ids.tolist(), res.top_logprobs.tolist()
    return [list(zip(i[:k], l[:k])) if k else None for i, l, k in zip(ids, lps, ks)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _load(model_or_path, tokenizer, dtype, device):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"model path {path!r} is not a directory (the engine loads local checkpoints only)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception:
                tokenizer = None
    else:
        model = model_or_path.eval()
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
    return model, tokenizer
