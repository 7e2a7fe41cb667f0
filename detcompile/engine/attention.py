"""The engine's attention: Hugging Face models call it through transformers' ``AttentionInterface``.

``Engine`` sets a model's attention implementation to ``"detcompile_paged"``. Each attention layer
then calls :func:`paged_attention_forward`, which calls one custom op,
``torch.ops.detcompile.engine_paged_attention``: it writes the step's new K/V into the layer's
pages and attends over the pages with ``torch.ops.detcompile.paged_attention``. The pages and the
step's layout (which tokens belong to which sequence) are not arguments of the op but live in a
:class:`StepContext` set around the forward (as vLLM's forward context does), so that Dynamo never
sees them: no guard on a Python int, no recompile when the batch changes, and the cache write is
invisible to functionalization (no copy of the cache per layer).

Bits: a decode step (one token per row) is one ``paged_attention`` call (``Lq = 1``, keys split
over programs when the batch is small); any other step is one ``paged_attention_varlen`` call over
its ragged rows, with a grid that a CUDA graph can hold. Both run one kernel that reduces a query
at absolute position p over keys 0..p in tiles fixed by p alone, so a token gets the same bits
prefilled, chunked, after a prefix-cache hit or decoded, alone or in any batch. An engine built
with ``attention_backend="fa3"`` or ``"flashinfer"`` routes the attention through that backend
instead (``engine.attention_backends``); the cache write is the same.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import detcompile.kernels  # noqa: F401  (registers torch.ops.detcompile.paged_attention)
from detcompile.kernels.kv_cache_write import write_kv

IMPLEMENTATION = "detcompile_paged"


@dataclass
class StepContext:
    """What the attention op needs to know about the step being run."""

    kv_caches: list[tuple[Tensor, Tensor]]  # per layer: [num_pages, page_size, Hkv, D] each
    slot_mapping: Tensor  # [T] int64: cache slot (page * page_size + offset) of each new token
    block_table: Tensor  # [B, W] int32: pages of each sequence of the step
    kv_lens: Tensor  # [B] int32: tokens of each sequence in the cache after this step
    # Ragged steps only (None: a decode step, token i is row i's one query):
    q_start: Tensor | None = None  # [B] int32: first token of each row in the step
    q_lens: Tensor | None = None  # [B] int32: tokens of each row in the step
    tiles: Tensor | None = None  # [2, N] int32: the kernel's programs (kernels.paged_attention.varlen_tiles)
    # Another attention backend (engine.attention_backends; None: the Triton kernel), its step
    # inputs by name (device tensors) and what its host-side plan gave for this step:
    backend: Any = None
    extra: dict = field(default_factory=dict)
    plan: Any = None


_current: StepContext | None = None


@contextlib.contextmanager
def step_context(ctx: StepContext):
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev


@torch.library.custom_op("detcompile::engine_paged_attention", mutates_args=())
def engine_paged_attention(q: Tensor, k: Tensor, v: Tensor, layer: int, scale: float, softcap: float, window: int,
                           sinks: Tensor | None) -> Tensor:
    """q [1, Hq, T, D], new k/v [1, Hkv, T, D] -> [1, T, Hq, Dv] (the layout HF attention returns).

    Writes k/v into the current step's cache of ``layer`` (hidden state, like vLLM's attention op:
    the op is declared pure so that functionalization does not copy the cache)."""
    ctx = _current
    if ctx is None:
        raise RuntimeError("detcompile: the engine's attention ran outside an engine step (no StepContext)")
    k_cache, v_cache = ctx.kv_caches[layer]
    T = q.shape[2]
    write_kv(k_cache, v_cache, ctx.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # one launch for both
    qt = q[0].transpose(0, 1)  # [T, Hq, D]
    if ctx.backend is not None:  # FA3 / FlashInfer: one call for decode and ragged steps alike
        return ctx.backend.attend(qt, k_cache, v_cache, ctx, scale, softcap, window, sinks).unsqueeze(0)
    if ctx.tiles is None:  # a decode step: its [T, Hq, 1, Dv] output is already the layout wanted
        out = torch.ops.detcompile.paged_attention(qt.unsqueeze(2), k_cache, v_cache, ctx.block_table, ctx.kv_lens,
                                                   scale, softcap, window, sinks)
        return out.view(1, T, q.shape[1], v_cache.shape[-1])
    out = torch.ops.detcompile.paged_attention_varlen(qt, k_cache, v_cache, ctx.block_table, ctx.kv_lens, ctx.q_start,
                                                      ctx.q_lens, ctx.tiles, scale, softcap, window, sinks)
    return out.unsqueeze(0)


@engine_paged_attention.register_fake
def _(q, k, v, layer, scale, softcap, window, sinks):
    return q.new_empty((1, q.shape[2], q.shape[1], v.shape[3]))


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention function (``AttentionInterface``): same signature as its sdpa one.
    ``sliding_window`` (query p sees keys p - w < k <= p, as transformers' masks), ``softcap`` and
    ``s_aux`` (gpt-oss sinks) are honoured by the kernel."""
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.ops.detcompile.engine_paged_attention(query, key, value, module.layer_idx, float(scale),
                                                      float(softcap or 0.0), int(sliding_window or 0), s_aux)
    return out, None


def register() -> None:
    """Make ``attn_implementation="detcompile_paged"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
