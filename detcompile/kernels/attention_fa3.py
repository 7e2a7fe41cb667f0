"""FlashAttention-3 as the engine's attention (``Engine(attention_backend="fa3")``): PyPI ``fa3-fwd``,
installed with ``pip install 'detcompile[fa3]'``. Importing this module does not import fa3-fwd;
``FA3Attention(...)`` does, and refuses what it cannot run bit-stably, naming why.

Facts relied on (fa3-fwd 0.0.3: its wheel's ``fa3_fwd_interface.py`` and ``fa3_fwd_config.py``, and
the flash-attention ``hopper/`` sources it builds: ``flash_api_stable.cpp``, ``tile_size.h``,
``heuristics.h``, ``flash_fwd_launch_template.h``):

- ``fa3_fwd_interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, page_table=,
  cu_seqlens_q=, max_seqlen_q=, softmax_scale=, causal=, softcap=, num_splits=, pack_gqa=)``: q is
  [total_q, Hq, D] when ``cu_seqlens_q`` is given; the caches are [num_pages, page_size, Hkv, D]
  (our layout) read through ``page_table`` [B, W] int32; ``cache_seqlens`` [B] int32 is each row's
  key count; causal masks are bottom-right aligned (a row's queries are its last keys, as ours); a
  row with no visible key gets zeros.
- ``fa3_fwd_config.CONFIG["build_flags"]``: 0.0.3 is built with FLASHATTENTION_DISABLE_PAGEDKV,
  _LOCAL, _FP16 and _BACKWARD. So: bf16 only, no sliding window, and a page table is accepted only
  on the TMA path (``get_pagedkv_tma``: sm90, ``page_size % kBlockN == 0`` and
  ``max_seqlen_q * Hq / Hkv > kBlockM``); otherwise the call fails with "does not support paged KV".
- The tile (kBlockM, kBlockN) comes from ``tile_size_fwd_sm90(head_dim, causal, local, ...)``; for
  bf16, causal, not local: d <= 64: (192, 128), <= 96: (192, 144), <= 128: (128, 128),
  <= 192: (128, 112) (value head dim > 128), <= 256: (128, 80).

What is pinned, and why (a row's bits must not depend on the step it runs in):

- ``num_splits=1``: 0 would let ``num_splits_heuristic`` split the keys by the batch's size and merge
  the parts (another reduction order per batch).
- ``max_seqlen_q`` is one constant per engine (``pinned_max_seqlen_q``), never the step's maximum:
  the host code reads it to decide (a) ``max_seqlen_q == 1`` turns ``causal`` off, which changes
  the tile (kBlockN 176 instead of 128 at head dim 128), (b) TMA or non-TMA paged KV by
  ``max_seqlen_q * group > kBlockM`` (a decode step vs a prefill step, or a batch whose longest
  row goes from 9 to 10 tokens, would switch kernels), (c) the pack-GQA and split heuristics. The
  constant is at least ``max_model_len`` (no row can be longer, so the grid always covers every
  query) and above ``kBlockM / group`` (the TMA path).
- ``pack_gqa`` fixed (True with GQA): ``None`` would decide from ``max_seqlen_q``.
- Decode and ragged steps make the same call (varlen, causal): one kernel for every path.

Within one kernel a query at position p reduces its keys in kBlockN tiles aligned at key 0, from
its own tile down to tile 0; tiles past p that a neighbour query of the same tile needs are fully
masked for it, which the online softmax passes through exactly (scale exp(0) = 1, sums + 0). So a
token gets the same bits prefilled, chunked, after a prefix-cache hit or decoded (checked on the GPU
by the engine's tests, ``tests/engine/test_backends_gpu.py``). The bits differ from the Triton
kernel's (another reduction order), which is expected.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._attention_backends import BackendNotInstalledError, BackendUnavailableError, effective_window, require_cuda

PACKAGE = "fa3-fwd"
INSTALL = "pip install 'detcompile[fa3]'"


def fa3_tile(head_dim: int) -> tuple[int, int]:
    """(kBlockM, kBlockN) of fa3-fwd's sm90 bf16 causal kernel for ``head_dim`` (tile_size.h)."""
    if head_dim <= 64:
        return 192, 128
    if head_dim <= 96:
        return 192, 144
    if head_dim <= 128:
        return 128, 128
    if head_dim <= 192:
        return 128, 112  # value head dim > 128
    return 128, 80


def default_block_size(head_dim: int) -> int:
    """The smallest page size the TMA paged path accepts: one key tile per page."""
    return fa3_tile(head_dim)[1]


def pinned_max_seqlen_q(max_model_len: int, group: int, block_m: int) -> int:
    """The one ``max_seqlen_q`` every call of an engine passes (see the module doc)."""
    return max(max_model_len, block_m // group + 1, 2)


def cu_seqlens_q(q_lens: Tensor | None, kv_lens: Tensor, tokens: int) -> Tensor:
    """int32 [rows + 1] query offsets of a step's rows. ``q_lens`` None: a decode layout (row i is
    token i). Tokens after the last row's queries (a CUDA graph's padding) go to the last row, which
    is then a spare row of no keys (FA3 writes zeros for a row that sees no key)."""
    rows = kv_lens.shape[0]
    if q_lens is None:
        if rows != tokens:
            raise ValueError(f"a decode layout has one token per row: {rows} rows, {tokens} tokens")
        return torch.arange(rows + 1, dtype=torch.int32)
    out = torch.zeros(rows + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(q_lens.to(torch.int64), 0).to(torch.int32)
    tail = tokens - int(out[-1])
    if tail < 0:
        raise ValueError(f"the rows hold {int(out[-1])} queries but the step has {tokens} tokens")
    if tail and int(kv_lens[-1]) != 0:
        raise ValueError("padding tokens need a spare last row of no keys")
    out[-1] = tokens
    return out


def _import_fa3():
    try:
        import fa3_fwd_config
        import fa3_fwd_interface
    except ImportError as e:
        raise BackendNotInstalledError(
            f"detcompile: attention_backend='fa3' needs the {PACKAGE} package (FlashAttention-3 forward for "
            f"Hopper GPUs): {INSTALL}") from e
    return fa3_fwd_interface, fa3_fwd_config.CONFIG.get("build_flags", {})


class FA3Attention:
    """The engine's attention through fa3-fwd's paged kernel (one call per layer and step)."""

    name = "fa3"
    input_names = ("cu_seqlens_q",)  # static per-step inputs (CUDA graphs) this backend reads

    def __init__(self, *, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, max_model_len: int):
        interface, flags = _import_fa3()
        require_cuda(self.name, device, min_cc=(9, 0), max_cc=(9, 0),
                     why="fa3-fwd's kernels are built for Hopper (sm90), and its paged KV needs Hopper's TMA")
        allowed = (torch.bfloat16,) if flags.get("FLASHATTENTION_DISABLE_FP16") else (torch.bfloat16, torch.float16)
        if dtype not in allowed:
            raise BackendUnavailableError(f"detcompile: attention_backend='fa3' runs {', '.join(map(str, allowed))} "
                                          f"only ({PACKAGE} build); the model is {dtype}")
        if head_dim > 256 or head_dim % 8:
            raise BackendUnavailableError(f"detcompile: attention_backend='fa3' supports head dims <= 256 that are "
                                          f"multiples of 8; the model's is {head_dim}")
        block_m, block_n = fa3_tile(head_dim)
        if block_size % block_n:
            raise BackendUnavailableError(
                f"detcompile: attention_backend='fa3' needs block_size to be a multiple of {block_n} at head dim "
                f"{head_dim} ({PACKAGE} reads a paged cache only through TMA, one {block_n}-key tile per page); "
                f"got block_size={block_size}. Leave block_size unset to get {block_n}.")
        self._attend = interface.flash_attn_with_kvcache
        self.version = _version()
        self.max_model_len = max_model_len
        self.max_seqlen_q = pinned_max_seqlen_q(max_model_len, num_heads // num_kv_heads, block_m)
        self.pack_gqa = num_heads != num_kv_heads
        self.softcap_ok = not flags.get("FLASHATTENTION_DISABLE_SOFTCAP")

    def describe(self) -> str:
        return (f"fa3 ({PACKAGE} {self.version}): num_splits=1, max_seqlen_q={self.max_seqlen_q}, "
                f"pack_gqa={self.pack_gqa}")

    # -- host side ------------------------------------------------------------------------------
    def extra_inputs(self, host: dict, ragged: bool) -> dict:
        return {"cu_seqlens_q": cu_seqlens_q(host["q_lens"] if ragged else None, host["lens"], host["ids"].shape[0])}

    def plan(self, host: dict, ragged: bool, key=None):
        return None  # nothing to do on the host: the call reads its layout on the device

    # -- the op ---------------------------------------------------------------------------------
    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, ctx, scale: float, softcap: float, window: int,
               sinks: Tensor | None) -> Tensor:
        """q [T, Hq, D] -> [T, Hq, Dv] over the pages the step's context names."""
        if sinks is not None:
            raise BackendUnavailableError("detcompile: attention_backend='fa3' cannot apply attention sinks "
                                          "(gpt-oss); use attention_backend='triton'")
        if effective_window(window, self.max_model_len):
            raise BackendUnavailableError(f"detcompile: attention_backend='fa3' cannot apply a sliding window "
                                          f"({window} tokens): {PACKAGE} is built without local attention; "
                                          "use attention_backend='triton'")
        if softcap and not self.softcap_ok:
            raise BackendUnavailableError(f"detcompile: attention_backend='fa3': this {PACKAGE} build has no "
                                          "logit softcapping; use attention_backend='triton'")
        return self._attend(q, k_cache, v_cache, cache_seqlens=ctx.kv_lens, page_table=ctx.block_table,
                            cu_seqlens_q=ctx.extra["cu_seqlens_q"], max_seqlen_q=self.max_seqlen_q,
                            softmax_scale=scale, causal=True, softcap=float(softcap), num_splits=1,
                            pack_gqa=self.pack_gqa)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # noqa: BLE001
        return "unknown"
