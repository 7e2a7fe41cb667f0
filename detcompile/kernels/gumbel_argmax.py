"""The sampler's last step in one pass: ``gumbel_argmax(z, temperature, seed, position, cut)``.

Per row b: greedy rows (temperature 0) take ``argmax(z[b])``; sampled rows take
``argmax(where(allowed[b], z[b] + gumbel(seed[b], position[b], v), -inf))``, the noise in fp64 and
ties to the lowest index, as ``engine.sampler`` defines them. The allowed tokens come as a cut of
the row's stable descending order (``sampler.allowed_cut``): v is allowed iff ``z[v] > value`` or
``z[v] == value and v <= index``. The eager form of the same thing
(``reference_gumbel_argmax``) is ~25 elementwise kernels over ``[B, V]`` int64 and fp64 tensors (the
hash, the logs, the mask, the argmax): at 256 rows of a 128k vocabulary that was ~2.5 ms of every
decode step on the H200. The Triton kernel reads ``z`` once and keeps the hash in registers.

Bits: the hash is integer arithmetic (exact anywhere, uint64 wrapping like the int64 tensors'); the
uniform ``((h >>> 12) + 0.5) * 2**-52`` is exact; ``-log(-log(u))`` runs the device's fp64 ``log``
(libdevice, the same code as ATen's), and the fp64 add rounds once. The argmax is exact: a chunk's
(max, lowest index of the max) pairs combine associatively, so how a row is split over programs
never matters. Batch-invariant: each row reads only its own inputs.

The noise in torch ops (``mix64``, ``uniform_noise``, ``gumbel_noise``; ``engine.sampler`` documents
the hash) lives here too, beside the kernel that must match it. CPU: ``reference_gumbel_argmax``.
NaN logits are outside the contract (the engine never produces them from finite weights).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _common


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)
_GOLDEN = _s64(0x9E3779B97F4A7C15)


def _srl(z: Tensor, s: int) -> Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign copies makes it logical.
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (bits as uint64; ``sampling_params.mix64`` twin)."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def uniform_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """[B] int64 seeds and positions -> [B, V] fp64 uniforms in (0, 1), integer ops only."""
    key = mix64(mix64(seed) + (position + 1) * _GOLDEN)
    counter = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seed.device) * _GOLDEN
    h = mix64(key[:, None] + counter)
    # 52 bits + 0.5 fit fp64's 53-bit significand: the conversion and the scaling are exact.
    return (_srl(h, 12).to(torch.float64) + 0.5) * 2.0**-52


def gumbel_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """[B, V] fp64 Gumbel noise, a function of (seed, position, vocab index) only."""
    u = uniform_noise(seed, position, vocab_size)
    if u.is_cuda:  # one device function per element, wherever it sits
        return -torch.log(-torch.log(u))
    # CPU: one fixed-length [V] tensor per row, so an element's code path depends on v alone.
    return torch.stack([-torch.log(-torch.log(r.clone())) for r in u.unbind(0)])


#: Vocabulary entries per loop iteration of a program.
BLOCK_V = 1024
#: Programs per row at most when the batch is small (more SMs reading one row; exact either way).
MAX_CHUNKS = 32

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl

    @triton.jit
    def _mix64(z):
        """splitmix64's finaliser on uint64 (wraps mod 2**64, logical shifts)."""
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit(do_not_specialize=["V", "chunk"])
    def _gumbel_argmax_kernel(z_ptr, cut_val_ptr, cut_idx_ptr, temp_ptr, seed_ptr, pos_ptr, best_ptr, idx_ptr,
                              V, sz, chunk, HAS_CUT: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        row64 = row.to(tl.int64)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, V)
        offs = tl.arange(0, BLOCK)
        sampled = tl.load(temp_ptr + row) != 0.0
        golden = 0x9E3779B97F4A7C15
        seed = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
        pos = tl.load(pos_ptr + row).to(tl.uint64, bitcast=True)
        key = _mix64(_mix64(seed) + (pos + 1) * golden)
        if HAS_CUT:
            cut_val = tl.load(cut_val_ptr + row)
            cut_idx = tl.load(cut_idx_ptr + row)
        best = tl.full([], float("-inf"), tl.float64)
        best_idx = tl.full([], 2147483647, tl.int32)
        for start in range(lo, hi, BLOCK):
            v = start + offs
            ok = v < hi
            z = tl.load(z_ptr + row64 * sz + v, mask=ok, other=float("-inf"))
            s = z.to(tl.float64)
            if NOISE:
                if sampled:
                    h = _mix64(key + (v.to(tl.uint64) + 1) * golden)
                    u = ((h >> 12).to(tl.float64) + 0.5) * 2.220446049250313e-16  # 2**-52
                    s = s + -tl.log(-tl.log(u))
                    if HAS_CUT:
                        keep = (z > cut_val) | ((z == cut_val) & (v <= cut_idx))
                        s = tl.where(keep, s, float("-inf"))
            s = tl.where(ok, s, float("-inf"))
            m = tl.max(s, axis=0)
            i = tl.min(tl.where(s == m, v, 2147483647), axis=0)
            take = m > best  # strictly: an equal max of a later block keeps the earlier index
            best_idx = tl.where(take, i, best_idx)
            best = tl.where(take, m, best)
        # A chunk whose entries are all -inf still names its first index (as torch.argmax would).
        best_idx = tl.where(best_idx == 2147483647, lo, best_idx)
        tl.store(best_ptr + row * tl.num_programs(1) + part, best)
        tl.store(idx_ptr + row * tl.num_programs(1) + part, best_idx)


def cut_mask(z: Tensor, cut: tuple[Tensor, Tensor]) -> Tensor:
    """[B, V] bool: the tokens a cut (value, index per row) allows."""
    value, index = cut
    v = torch.arange(z.shape[-1], device=z.device)
    return (z > value[:, None]) | ((z == value[:, None]) & (v <= index[:, None]))


def reference_gumbel_argmax(z: Tensor, temperature: Tensor, seed: Tensor, position: Tensor,
                            cut: Optional[tuple[Tensor, Tensor]], noise: bool = True) -> Tensor:
    """The definition in torch ops (the CPU path): [B] int64 tokens."""
    tokens = torch.argmax(z, dim=-1)
    if not noise:
        return tokens
    score = z.double() + gumbel_noise(seed, position, z.shape[-1])
    if cut is not None:
        score = score.masked_fill(~cut_mask(z, cut), float("-inf"))
    return torch.where(temperature == 0, tokens, torch.argmax(score, dim=-1))


def gumbel_argmax(z: Tensor, temperature: Tensor, seed: Tensor, position: Tensor,
                  cut: Optional[tuple[Tensor, Tensor]] = None, noise: bool = True, *, _triton: bool = False) -> Tensor:
    """[B, V] fp32 processed logits -> [B] int64 tokens (greedy rows: argmax; sampled rows: Gumbel-max
    over the tokens ``cut`` allows, all when None). ``noise=False``: every row greedy (no hash
    computed). The Triton kernel runs on CUDA; ``_triton`` forces it under the interpreter (tests)."""
    use = (z.is_cuda or (_triton and _common.triton_interpret())) and _common.HAS_TRITON
    if not use or z.dtype != torch.float32:
        return reference_gumbel_argmax(z, temperature, seed, position, cut, noise)
    B, V = z.shape
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=z.device)
    z = z if z.stride(1) == 1 else z.contiguous()
    # Split a row over programs only while the batch leaves SMs idle (the result is exact anyway).
    parts = max(1, min(MAX_CHUNKS, _common.num_sms(z.device) // B, triton.cdiv(V, BLOCK_V)))
    chunk = triton.cdiv(triton.cdiv(V, parts), BLOCK_V) * BLOCK_V
    parts = triton.cdiv(V, chunk)
    best = torch.empty((B, parts), dtype=torch.float64, device=z.device)
    idx = torch.empty((B, parts), dtype=torch.int32, device=z.device)
    with _common.on_device(z):
        _gumbel_argmax_kernel[(B, parts)](
            z, *(cut if cut is not None else (z, z)), temperature, seed, position, best, idx,
            V, z.stride(0), chunk,
            HAS_CUT=cut is not None, NOISE=bool(noise), BLOCK=BLOCK_V, num_warps=4,
        )
    if parts == 1:
        return idx[:, 0].long()
    # Chunks are in index order: the first chunk holding the row's max holds its lowest index.
    return idx.gather(1, torch.argmax(best, dim=1, keepdim=True))[:, 0].long()
