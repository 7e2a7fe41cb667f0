"""Sliding windows and attention sinks in ``detcompile::paged_attention`` (the engine's Mistral,
Gemma2 and gpt-oss layers): right against a float64 reference, and the same bits for a token
whether it is prefilled in one call, in chunks, or decoded, alone or in a batch, with the keys
split over programs or not."""
import pytest
import torch

from detcompile.kernels.attention_cpu import cpu_paged_attention
from detcompile.kernels.paged_attention import triton_paged_attention

from .._subset import cpu_subset
from ._util import LAUNCH_DEV, needs_triton, rel_err
from .test_attention import randn
from .test_paged_attention import SMALL, build_cache

B, HQ, HKV, L, D, PAGE = 2, 4, 2, 53, 16, 4


def reference(q, k, v, window, sinks, scale):
    """float64 attention of the last Lq positions over keys [0, L) with window and sinks."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    Lq, Lk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * scale
    qpos = torch.arange(Lk - Lq, Lk)[:, None]
    kpos = torch.arange(Lk)[None, :]
    vis = kpos <= qpos
    if window:
        vis &= kpos > qpos - window
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        sk = sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        p = torch.softmax(torch.cat([s, sk], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    return p @ v


def cases():
    return [(0, True), (7, False), (7, True), (16, True), (100, False)]


def run_paths(fn, gen, window, with_sinks, dev, **kw):
    q = randn(gen, B, HQ, L, D, device=dev)
    k, v = randn(gen, B, HKV, L, D, device=dev), randn(gen, B, HKV, L, D, device=dev)
    sinks = (randn(gen, HQ, device=dev) * 2) if with_sinks else None
    kc, vc, bt = build_cache(k, v, PAGE, gen)
    lens = torch.tensor([L, L], dtype=torch.int32, device=dev)
    full = fn(q, kc, vc, bt, lens, None, 0.0, window, sinks, **kw)
    # chunks of 10 tokens, each attending to the cache up to its end
    for s in range(0, L, 10):
        e = min(L, s + 10)
        part = fn(q[:, :, s:e], kc, vc, bt, torch.tensor([e, e], dtype=torch.int32, device=dev), None, 0.0, window,
                  sinks, **kw)
        assert torch.equal(part, full[:, :, s:e]), (s, e)
    # every token decoded: row 1 alone, and both rows as a batch
    for t in (0, 6, 7, 31, L - 1):
        n = torch.tensor([t + 1, t + 1], dtype=torch.int32, device=dev)
        both = fn(q[:, :, t:t + 1], kc, vc, bt, n, None, 0.0, window, sinks, **kw)
        one = fn(q[1:, :, t:t + 1], kc, vc, bt[1:], n[1:], None, 0.0, window, sinks, **kw)
        assert torch.equal(both, full[:, :, t:t + 1]) and torch.equal(one, full[1:, :, t:t + 1]), t
    ref = reference(q.cpu(), k.cpu(), v.cpu(), window, None if sinks is None else sinks.cpu(), D ** -0.5)
    return full, ref


@pytest.mark.parametrize("window, with_sinks", cases())
def test_cpu_window_and_sinks(gen, window, with_sinks):
    full, ref = run_paths(cpu_paged_attention, gen, window, with_sinks, "cpu")
    assert rel_err(full, ref) < 1e-6


@needs_triton
@pytest.mark.parametrize("par", [False, True])
@pytest.mark.parametrize("window, with_sinks", cpu_subset(cases(), keep=[(7, True), (100, False)]))
def test_triton_window_and_sinks(gen, window, with_sinks, par):
    full, ref = run_paths(triton_paged_attention, gen, window, with_sinks, LAUNCH_DEV, _parallel_splits=par, **SMALL)
    assert rel_err(full.cpu(), ref) < 1e-5


def test_bad_window_and_sinks_are_refused(gen):
    q = randn(gen, 1, HQ, 1, D)
    kc = torch.zeros(3, PAGE, HKV, D)
    bt = torch.ones(1, 2, dtype=torch.int32)
    n = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="window"):
        torch.ops.detcompile.paged_attention(q, kc, kc, bt, n, None, 0.0, -1, None)
    with pytest.raises(ValueError, match="sinks"):
        torch.ops.detcompile.paged_attention(q, kc, kc, bt, n, None, 0.0, 0, torch.zeros(HQ + 1))
