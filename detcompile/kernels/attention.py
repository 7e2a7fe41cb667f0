"""Batch-invariant scaled-dot-product attention: ``torch.ops.detcompile.attention`` (registration
and autograd).

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` (no dropout) plus
optional logit soft-capping, with one deliberate difference: a query row that sees no key at all
returns zeros (torch returns NaN for an all-False bool mask, and a plain average of ``v`` for an
all-``finfo.min`` float mask). Float-mask entries ``<= finfo(mask.dtype).min`` (and ``-inf``) count
as *masked* (exactly excluded), which is what Hugging Face means by them.

Where the code is: ``attention_inputs`` (argument checks, mask analysis: segment origins),
``attention_triton`` (the GPU kernel and why it is batch-invariant), ``attention_cpu`` (the CPU
path and why it is batch-invariant), ``attention_dense_backends`` (``backend="fa3" | "flashinfer"``:
the same call through those libraries, the compile backend's ``attention_backend`` option);
``paged_attention`` holds the paged-KV-cache ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError
from .attention_cpu import cpu_attention
from .attention_dense_backends import dense_attention
from .attention_inputs import OP, _default_scale, _expand_kv, _validate, _visibility_and_bias
from .attention_triton import triton_attention


# ----------------------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float = 0.0,
    backend: str = "triton",
) -> Tensor:
    _common.check_inputs(OP, q, k, v, attn_mask)
    raise UnsupportedError(f"detcompile.{OP}: device {q.device.type!r} is not supported (only cpu and cuda)")


@attention.register_fake
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0, backend="triton"):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@attention.register_kernel("cpu")
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0, backend="triton"):
    if backend != "triton":
        raise UnsupportedError(f"detcompile.{OP}: attention_backend={backend!r} runs on CUDA GPUs only; the "
                               "tensors are on the CPU (use attention_backend='triton')")
    return cpu_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


@attention.register_kernel("cuda")
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0, backend="triton"):
    _common.check_inputs(OP, q, k, v, attn_mask)
    if backend != "triton":  # options={"attention_backend": "fa3" | "flashinfer"}
        q4, k4, v4, m4 = _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)
        out = dense_attention(backend, q4, k4, v4, m4, is_causal, scale, softcap)
        return out[0] if q.dim() == 3 else out
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: the CUDA path needs Triton")
    return triton_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


# ----------------------------------------------------------------------------------------------
# Autograd: the backward recomputes attention in float32 (float64 for float64) with the math
# formula (no batch invariance needed there) and applies the closed-form gradients.
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap = inputs[:8]  # the 9th: the forward's backend
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.is_causal, ctx.scale, ctx.softcap = is_causal, scale, softcap


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v, grad_out = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), grad_out.unsqueeze(0)
    dt = _common.acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = ctx.scale if ctx.scale is not None else _default_scale(D)
    softcap = ctx.softcap
    qf, kf, vf, go = q.to(dt), _expand_kv(k.to(dt), Hq), _expand_kv(v.to(dt), Hq), grad_out.to(dt)

    s1 = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        th = torch.tanh(s1 / softcap)
        s = softcap * th
    else:
        s = s1
    m4 = None
    if attn_mask is not None:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    vis, bias = _visibility_and_bias(m4, ctx.is_causal, Lq, Lk, q.device)
    if bias is not None:
        s = s + bias.to(dt)
    if vis is not None:
        s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    m = torch.amax(s, dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = torch.where(l > 0, e / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(e))
    out = torch.matmul(p, vf)

    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vf.transpose(-1, -2))
    ds = p * (dp - (go * out).sum(-1, keepdim=True))  # softmax backward; masked p = 0
    if softcap > 0:
        ds = ds * (1.0 - th * th)
    ds = ds * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    if g > 1:  # sum the gradients of the query heads that share a kv head
        dk = dk.reshape(B, Hkv, g, Lk, D).sum(2)
        dv = dv.reshape(B, Hkv, g, Lk, dv.shape[-1]).sum(2)
    dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if squeeze:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq, dk, dv, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
