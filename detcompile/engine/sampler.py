"""Batch-invariant sampler: tokens and logprobs that depend on one row's logits, parameters, seed,
position and token history, never on the rest of the batch.

Pipeline for logits ``[B, V]`` (any float dtype, converted to fp32 exactly or by rounding fp64):

1. Penalties (vLLM's rules): the repetition penalty divides positive / multiplies negative logits
   of tokens seen in the prompt or the output; then ``- frequency * count_in_output`` and
   ``- presence * (count_in_output > 0)``; banned tokens (e.g. EOS before ``min_new_tokens``) get
   -inf; then ``/ temperature`` (greedy rows divide by 1). Counts come from an integer
   ``scatter_add`` (exact in any order); everything else is one IEEE op per element (mul, div, sub,
   select: correctly rounded, no fusion), so the bits cannot depend on where the element sits.
2. Greedy rows (temperature 0): ``argmax`` of the processed logits, ties to the lowest index
   (torch's documented argmax rule); top-k / top-p / min-p do not apply.
3. Sampled rows: ``argmax`` over the allowed tokens of ``processed + gumbel`` (fp64), ties to the
   lowest index. Gumbel-max samples softmax(processed) exactly, restricted to the allowed set.
   Allowed set, from one stable descending sort of the row (a permutation: exact, and equal values
   keep their index order): top-k keeps ranks < k, so **ties at the boundary keep the lowest
   indices**; top-p takes probabilities = ``detcompile.softmax`` of the top-k-masked sorted row and
   an exclusive prefix sum via ``detcompile.cumsum`` (both batch-invariant ops), keeping a token
   while the sum of the tokens before it is < top_p (top_p = 1 keeps all, without trusting the
   rounded sum; the top token is always kept); min-p keeps ``p >= min_p * p_max`` on the same
   probabilities. The set is the longest sorted prefix all three keep, handed on as a cut (the
   last kept value and index), which ``kernels.gumbel_argmax`` applies while it reads the row.
4. Logprobs: ``detcompile.softmax(..., log=True)`` (fp32) of the raw or the processed logits (per
   row, ``logprobs_mode``), gathered at the chosen token; top alternatives by a stable descending
   sort (ties to the lowest index). ``token_logprobs`` runs the same code for ``score()``.

Noise: a counter-based hash, no generator state. ``mix64`` is splitmix64's finaliser done in int64
tensors (multiplication wraps mod 2**64; logical right shifts are an arithmetic shift plus a
mask). Row key ``k = mix64(mix64(seed) + (position + 1) * G)``, element ``h = mix64(k + (v + 1) *
G)`` with G the golden-ratio constant (the splitmix64 stream of seed k). The top 52 bits give
``u = ((h >>> 12) + 0.5) * 2**-52``, exactly representable and strictly inside (0, 1), and the noise
is ``-log(-log(u))`` in fp64. Integer ops are exact anywhere; the logs are elementwise: on CUDA
every element runs the same device function, so the batch is done at once; on the CPU (and any
other device) the vector body and the tail of a loop may differ, so each row is done alone over a
fixed-length ``[V]`` tensor. Everything else is per-row (sort, argmax, the detcompile softmax/cumsum) or exact.

No host syncs on the sampling path (no ``.item()``, ``.tolist()``, boolean indexing): only the
host flags of ``SamplingBatch``, fixed when the batch is built, choose which steps run, and a step
that is skipped is an exact no-op for the rows that do not use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import kernels  # noqa: F401  (registers torch.ops.detcompile.*)
from ..kernels.gumbel_argmax import cut_mask, gumbel_argmax, gumbel_noise, mix64, uniform_noise  # noqa: F401
from .sampling_params import SamplingParams

_NEG_INF = float("-inf")


def _to_device(t: Tensor, device) -> Tensor:
    """A host tensor on ``device`` without waiting for the GPU: pinned, then an asynchronous copy
    (a copy from pageable memory would block until the stream drains, i.e. until the forward that
    made the logits has finished, so the sampler's launches could not overlap it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pad(rows: Optional[Sequence[Sequence[int]]], device) -> Optional[Tensor]:
    """Ragged id lists -> [B, L] int64 padded with -1 (None when there is nothing)."""
    if rows is None or not any(len(r) for r in rows):
        return None
    width = max(len(r) for r in rows)
    return _to_device(torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.int64),
                      device)


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step, as tensors on the logits' device.

    ``position`` is the absolute index in the sequence of the token being sampled (the first
    generated token of a prompt of length L has position L). Id tensors are ``[B, L]`` int64
    padded with -1. The host flags only skip work that would be an exact no-op for every row.
    """
    temperature: Tensor  # [B] fp32, 0 = greedy
    top_k: Tensor  # [B] int64, <= 0 = off
    top_p: Tensor  # [B] fp32, 1 = off
    min_p: Tensor  # [B] fp32, 0 = off
    frequency_penalty: Tensor  # [B] fp32
    presence_penalty: Tensor  # [B] fp32
    repetition_penalty: Tensor  # [B] fp32
    seed: Tensor  # [B] int64
    position: Tensor  # [B] int64
    processed_logprobs: Tensor  # [B] bool: logprobs_mode == "processed"
    prompt_ids: Optional[Tensor] = None  # repetition penalty only
    output_ids: Optional[Tensor] = None  # all penalties
    banned_ids: Optional[Tensor] = None  # -inf this step (e.g. EOS before min_new_tokens)
    num_top_logprobs: int = 0  # K of the returned alternatives (the batch's largest request)
    all_greedy: bool = False
    use_filters: bool = True
    use_penalties: bool = True

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], positions: Sequence[int],
                    seeds: Optional[Sequence[int]] = None,
                    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                    output_ids: Optional[Sequence[Sequence[int]]] = None,
                    banned_ids: Optional[Sequence[Sequence[int]]] = None,
                    device="cpu") -> "SamplingBatch":
        """One row per entry of ``params``; ``seeds`` default to each row's effective seed (pass
        ``p.sample_seed(i)`` for the i-th of n samples)."""
        seeds = [p.effective_seed for p in params] if seeds is None else list(seeds)
        if not len(seeds) == len(positions) == len(params):
            raise ValueError("params, positions and seeds must have one entry per row")
        if any(not 0 <= s < 2**63 for s in seeds) or any(q < 0 for q in positions):
            raise ValueError("seeds must be in [0, 2**63) and positions >= 0")

        # Two host tensors, two copies: the per-row floats and the per-row integers.
        # + 0.0 turns -0.0 into +0.0: a zero penalty is then an exact no-op.
        names = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
        # (numpy builds them from the lists ~2x faster than torch.tensor: host time the GPU waits for)
        f32 = np.array([[getattr(p, n) for p in params] for n in names], dtype=np.float32).reshape(len(names), -1)
        f32 = _to_device(torch.from_numpy(f32 + np.float32(0.0)), device)
        i64 = _to_device(torch.from_numpy(np.array(
            [[max(p.top_k, 0) for p in params], list(seeds), list(positions),
             [p.logprobs_mode == "processed" for p in params]], dtype=np.int64).reshape(4, -1)), device)
        sampled = [p for p in params if p.temperature != 0]
        use_pen = any(p.repetition_penalty != 1 or p.frequency_penalty != 0
                      or p.presence_penalty != 0 for p in params)
        return cls(
            temperature=f32[0], top_k=i64[0], top_p=f32[1], min_p=f32[2], frequency_penalty=f32[3],
            presence_penalty=f32[4], repetition_penalty=f32[5], seed=i64[1], position=i64[2],
            processed_logprobs=i64[3] != 0,
            prompt_ids=_pad(prompt_ids, device) if use_pen else None,
            output_ids=_pad(output_ids, device) if use_pen else None,
            banned_ids=_pad(banned_ids, device),
            num_top_logprobs=max([p.logprobs or 0 for p in params], default=0),
            all_greedy=not sampled,
            use_filters=any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in sampled),
            use_penalties=use_pen,
        )


class Logprobs(NamedTuple):
    logprobs: Tensor  # [N] fp32, of the given / chosen tokens
    top_ids: Optional[Tensor]  # [N, K] int64, descending, ties to the lowest index
    top_logprobs: Optional[Tensor]  # [N, K] fp32


class SamplerOutput(NamedTuple):
    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] fp32
    top_ids: Optional[Tensor]
    top_logprobs: Optional[Tensor]


def _counts(ids: Tensor, vocab_size: int) -> Tensor:
    """[B, L] ids (-1 = padding) -> [B, V] int32 occurrence counts."""
    ids = torch.where((ids < 0) | (ids >= vocab_size), vocab_size, ids)  # padding -> spare bin
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int32, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))[:, :vocab_size]


def process_logits(logits: Tensor, batch: SamplingBatch) -> tuple:
    """-> (raw, processed), both [B, V] fp32: penalties, banned tokens, then temperature."""
    x = logits.float()
    V = x.shape[-1]
    z = x
    if batch.use_penalties:
        out = (_counts(batch.output_ids, V) if batch.output_ids is not None
               else torch.zeros(x.shape, dtype=torch.int32, device=x.device))
        in_out = out > 0
        seen = in_out if batch.prompt_ids is None else in_out | (_counts(batch.prompt_ids, V) > 0)
        r = batch.repetition_penalty[:, None]
        z = torch.where(seen, torch.where(z > 0, z / r, z * r), z)
        # Separate mul and sub ops (no fused multiply-add): one rounding each, per element.
        z = z - batch.frequency_penalty[:, None] * out.float()
        z = z - batch.presence_penalty[:, None] * in_out.float()
    if batch.banned_ids is not None:
        z = z.masked_fill(_counts(batch.banned_ids, V) > 0, _NEG_INF)
    t = batch.temperature[:, None]
    # A tensor divisor (never a Python float, which CUDA turns into a reciprocal multiply).
    return x, z / torch.where(t == 0, torch.ones_like(t), t)


def allowed_cut(z: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor]:
    """The tokens top-k, then top-p and min-p leave to sample from, as a cut of the row's stable
    descending order: ([B] fp32 value, [B] int64 index) of the last kept token. Token v is kept
    iff ``z[v] > value or (z[v] == value and v <= index)`` (equal values sort by index). Each
    filter keeps a prefix of the sorted row; the kept set is the longest prefix all of them keep
    (at least the top token), so a cut describes it and no [B, V] mask is scattered back."""
    V = z.shape[-1]
    sz, order = torch.sort(z, dim=-1, descending=True, stable=True)
    k = batch.top_k[:, None]
    keep = (k <= 0) | (torch.arange(V, device=z.device) < k)
    p = torch.ops.detcompile.softmax(sz.masked_fill(~keep, _NEG_INF), -1, False, False)
    c = torch.ops.detcompile.cumsum(p, -1)
    before = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)  # exclusive: no subtraction
    top_p = batch.top_p[:, None]
    keep = keep & ((before < top_p) | (top_p >= 1)) & (p >= batch.min_p[:, None] * p[:, :1])
    # Length of the kept prefix: the first dropped rank (argmax of the first True), or V.
    dropped = ~keep
    n = torch.where(dropped.any(-1), torch.argmax(dropped.to(torch.uint8), -1), V).clamp_(min=1)
    last = (n - 1)[:, None]
    return sz.gather(1, last)[:, 0], order.gather(1, last)[:, 0]


def allowed_mask(z: Tensor, batch: SamplingBatch) -> Tensor:
    """[B, V] bool form of ``allowed_cut``."""
    return cut_mask(z, allowed_cut(z, batch))


def _logprobs(x: Tensor, token_ids: Tensor, num_top: int) -> Logprobs:
    lp = torch.ops.detcompile.softmax(x, -1, False, True)
    chosen = lp.gather(1, token_ids[:, None].long()).squeeze(1)
    if num_top <= 0:
        return Logprobs(chosen, None, None)
    top_lp, top_ids = torch.sort(lp, dim=-1, descending=True, stable=True)
    return Logprobs(chosen, top_ids[:, :num_top], top_lp[:, :num_top])


def token_logprobs(logits: Tensor, token_ids: Tensor, num_top: int = 0,
                   batch: Optional[SamplingBatch] = None) -> Logprobs:
    """Logprobs of ``token_ids`` [N] under ``logits`` [N, V], bitwise what the sampler reports for
    the same row and token. ``batch=None``: raw mode (the model's logits); with a batch, each row
    is processed as the sampler would and its ``logprobs_mode`` picks raw or processed."""
    if batch is None:
        return _logprobs(logits.float(), token_ids, num_top)
    x, z = process_logits(logits, batch)
    return _logprobs(torch.where(batch.processed_logprobs[:, None], z, x), token_ids, num_top)


def sample(logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Chosen tokens [B] int64, their logprobs [B] fp32 and, if any row asked, the top
    ``batch.num_top_logprobs`` alternatives [B, K] of each row (a row that asked for k uses the
    first k columns: the sort is per row)."""
    x, z = process_logits(logits, batch)
    allowed = allowed_cut(z, batch) if not batch.all_greedy and batch.use_filters else None
    # argmax of z (greedy rows) or of z + noise over the allowed tokens; one kernel on CUDA
    tokens = gumbel_argmax(z, batch.temperature, batch.seed, batch.position, allowed, not batch.all_greedy)
    lp = _logprobs(torch.where(batch.processed_logprobs[:, None], z, x), tokens,
                   batch.num_top_logprobs)
    return SamplerOutput(tokens, *lp)


class Sampler:
    """``Sampler()(logits, batch)``: the engine's handle on ``sample``."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        return sample(logits, batch)
