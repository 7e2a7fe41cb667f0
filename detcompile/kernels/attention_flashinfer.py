"""FlashInfer as the engine's attention (``Engine(attention_backend="flashinfer")``): PyPI
``flashinfer-python``, installed with ``pip install 'detcompile[flashinfer]'``. Importing this
module does not import flashinfer; ``FlashInferAttention(...)`` does.

Facts relied on (flashinfer-python 0.7.4: ``flashinfer/decode.py``, ``flashinfer/prefill.py`` and
``data/include/flashinfer/attention/scheduler.cuh``, ``utils.cuh`` of its wheel):

- ``BatchDecodeWithPagedKVCacheWrapper(float_workspace, "NHD", use_cuda_graph=, use_tensor_cores=,
  paged_kv_indptr_buffer=, paged_kv_indices_buffer=, paged_kv_last_page_len_buffer=, backend=)``;
  ``plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
  window_left=, logits_soft_cap=, q_data_type=, kv_data_type=, o_data_type=, sm_scale=,
  fixed_split_size=, disable_split_kv=, non_blocking=)`` runs on the host (``plan`` cannot be
  captured in a CUDA graph); ``run(q, (k_cache, v_cache))`` with q [batch, Hq, D] and "NHD" caches
  [num_pages, page_size, Hkv, D] (our layout). Request i reads pages
  ``indices[indptr[i]:indptr[i+1]]``, the last one holding ``last_page_len[i]`` (1..page_size) keys.
- With ``use_tensor_cores=True`` and ``backend="fa2"`` the decode wrapper runs FlashInfer's FA2
  *prefill* kernel, planned with ``uniform_q_len=1``: its query tile (CTA_TILE_Q 16/64/128, which
  changes the warp layout and key tile, so the bits) is ``FA2DetermineCtaTileQ(group)`` in eager
  and in CUDA-graph mode alike, a function of the model (query heads per KV head, head dim) only.
  ``backend="auto"`` could pick another kernel (FA3 on sm90, cuDNN, XQA) per plan: pinned to fa2.
- The batch prefill wrapper picks that tile from the batch instead (eager: the mean packed query
  length; CUDA graphs: the declared capacity minus the batch size), so two batches of other
  composition run other tiles: the trap this backend avoids by not using it.
- ``disable_split_kv=True``: one key chunk per request, no merge. ``fixed_split_size`` would also
  split at fixed page boundaries and merge in a fixed order, but under CUDA graphs the number of
  chunks must fit the captured grid, and graph and eager steps must give the same bits, so no
  step splits.

The route: every query token of a step, prefill or decode, is one decode request over its own
prefix (query at position p: keys 0..p, pages ``block_table[row, :ceil((p+1)/page)]``; the host
builds indptr/indices/last_page_len in ``decode_route_metadata``). A query's reduction then
depends on its own key count and the model's fixed tile alone: the same bits prefilled, chunked,
after a prefix-cache hit (radix) or decoded, in any batch, in a graph or not. The price: a prefill
chunk of T tokens reads its prefix T times (decode steps cost what FlashInfer's decode costs).

CUDA graphs: one graph-mode wrapper per captured graph (its batch is the graph's token count, its
buffers fixed), planned with zeros before capture and re-planned on the host with the step's
layout right before each replay (``plan`` rewrites the buffers the captured kernel reads). Eager
steps use one plain wrapper, planned per step. Layers that pass other attention parameters
(scale, sliding window, softcap) get a wrapper each; the parameters are learned in the warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._attention_backends import BackendNotInstalledError, BackendUnavailableError, effective_window, require_cuda

PACKAGE = "flashinfer-python"
INSTALL = "pip install 'detcompile[flashinfer]'"
HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 64 << 20  # float workspace of every wrapper (split-KV scratch, unused with no split)


def decode_route_metadata(table: Tensor, kv_lens: Tensor, q_start: Tensor | None, q_lens: Tensor | None,
                          tokens: int, page_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(indptr [tokens + 1], indices [nnz], last_page_len [tokens]), int32 host tensors: token t of
    the step as one request over its own prefix. A row's queries are its last ``q_lens`` keys
    (``q_lens`` None: a decode layout, row i is token i, its query the row's last key). Tokens of
    no row, and rows of no keys (padding), read the first key of the reserved page 0: finite values
    that nothing uses."""
    table_np = table.numpy()
    lens = kv_lens.numpy().astype(np.int64)
    row = np.full(tokens, -1, np.int64)
    kv = np.zeros(tokens, np.int64)
    if q_lens is None:
        if lens.shape[0] != tokens:
            raise ValueError(f"a decode layout has one token per row: {lens.shape[0]} rows, {tokens} tokens")
        row[:] = np.arange(tokens)
        kv[:] = lens
    else:
        n = q_lens.numpy().astype(np.int64)
        start = q_start.numpy().astype(np.int64)
        owner = np.repeat(np.arange(n.shape[0]), n)
        offset = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n) - n, n)  # i-th query of its row
        where = np.repeat(start, n) + offset
        if where.size and where.max() >= tokens:
            raise ValueError("a row's queries run past the step's tokens")
        row[where] = owner
        kv[where] = lens[owner] - n[owner] + 1 + offset
    pad = (row < 0) | (kv <= 0)
    row[pad], kv[pad] = -1, 1
    pages = -(-kv // page_size)
    indptr = np.zeros(tokens + 1, np.int64)
    indptr[1:] = np.cumsum(pages)
    r = np.repeat(row, pages)
    j = np.arange(indptr[-1]) - np.repeat(indptr[:-1], pages)
    indices = np.where(r >= 0, table_np[np.maximum(r, 0), j], 0)
    last = kv - (pages - 1) * page_size
    as_t = lambda a: torch.from_numpy(a.astype(np.int32))  # noqa: E731
    return as_t(indptr), as_t(indices), as_t(last)


def _import_flashinfer():
    try:
        from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
    except ImportError as e:
        raise BackendNotInstalledError(
            f"detcompile: attention_backend='flashinfer' needs the {PACKAGE} package: {INSTALL} (its kernels are "
            f"compiled on first use, which needs the CUDA toolkit's nvcc); importing it failed with "
            f"{type(e).__name__}: {e}") from e
    return BatchDecodeWithPagedKVCacheWrapper


@dataclass
class _Step:
    """One step's route metadata and the wrappers planned for it (by attention parameters)."""

    indptr: Tensor
    indices: Tensor
    last_page_len: Tensor
    key: object  # None: an eager step; else the CUDA graph it replays
    wrappers: dict = field(default_factory=dict)


class FlashInferAttention:
    """The engine's attention through FlashInfer's tensor-core decode kernel (one request per query)."""

    name = "flashinfer"
    input_names = ()  # nothing static: plan() writes the wrappers' own buffers

    def __init__(self, *, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, max_model_len: int, max_pages: int):
        self._wrapper_cls = _import_flashinfer()
        require_cuda(self.name, device, min_cc=(8, 0), why="FlashInfer's FA2 kernels need compute capability >= 8.0")
        if dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnavailableError(f"detcompile: attention_backend='flashinfer' runs float16 and bfloat16; "
                                          f"the model is {dtype}")
        if head_dim not in HEAD_DIMS:
            raise BackendUnavailableError(f"detcompile: attention_backend='flashinfer' supports head dims "
                                          f"{HEAD_DIMS}; the model's is {head_dim}")
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.max_model_len, self.max_pages = block_size, max_model_len, max_pages
        self.version = _version()
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.params: list[tuple] = []  # (scale, window_left, softcap) of the model's layers
        self._eager: dict = {}  # params -> wrapper planned per eager step
        self._graphs: dict = {}  # (graph key, params) -> wrapper with fixed buffers

    def describe(self) -> str:
        return (f"flashinfer ({PACKAGE} {self.version}): every query a tensor-core decode request (fa2), "
                "split-KV disabled")

    # -- host side ------------------------------------------------------------------------------
    def extra_inputs(self, host: dict, ragged: bool) -> dict:
        return {}

    def plan(self, host: dict, ragged: bool, key=None) -> _Step:
        """Route metadata of the step; every known parameter set is planned now (before a capture
        or a replay); an eager step plans a new one when a layer first shows it."""
        meta = decode_route_metadata(host["table"], host["lens"], host.get("q_start") if ragged else None,
                                     host.get("q_lens") if ragged else None, host["ids"].shape[0], self.page_size)
        step = _Step(*meta, key=key)
        for params in self.params:
            self._plan(step, params)
        return step

    def _wrapper(self, key, params, tokens: int):
        if key is None:
            if params not in self._eager:
                self._eager[params] = self._wrapper_cls(self.workspace, "NHD", use_tensor_cores=True, backend="fa2")
            return self._eager[params]
        if (key, params) not in self._graphs:
            z = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
            self._graphs[key, params] = self._wrapper_cls(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, backend="fa2",
                paged_kv_indptr_buffer=z(tokens + 1), paged_kv_indices_buffer=z(tokens * self.max_pages),
                paged_kv_last_page_len_buffer=z(tokens))
        return self._graphs[key, params]

    def _plan(self, step: _Step, params: tuple) -> None:
        scale, window_left, softcap = params
        wrapper = self._wrapper(step.key, params, step.last_page_len.shape[0])
        wrapper.plan(step.indptr, step.indices, step.last_page_len, self.num_heads, self.num_kv_heads, self.head_dim,
                     self.page_size, pos_encoding_mode="NONE", window_left=window_left, logits_soft_cap=softcap,
                     q_data_type=self.dtype, kv_data_type=self.dtype, o_data_type=self.dtype, sm_scale=scale,
                     disable_split_kv=True, non_blocking=True)
        step.wrappers[params] = wrapper

    # -- the op ---------------------------------------------------------------------------------
    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, ctx, scale: float, softcap: float, window: int,
               sinks: Tensor | None) -> Tensor:
        """q [T, Hq, D] -> [T, Hq, D]: each token over its own prefix (the step's plan)."""
        if sinks is not None:
            raise BackendUnavailableError("detcompile: attention_backend='flashinfer' does not apply attention "
                                          "sinks (gpt-oss) in detcompile yet; use attention_backend='triton'")
        w = effective_window(window, self.max_model_len)
        # FlashInfer's window_left: query p sees keys p - window_left .. p, ours p - window < k <= p
        params = (float(scale), w - 1 if w else -1, float(softcap))
        step = ctx.plan
        if params not in step.wrappers:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"detcompile: flashinfer attention parameters {params} first seen inside a CUDA "
                                   "graph capture (the warm-up should have shown every layer's)")
            self.params.append(params)
            self._plan(step, params)
        return step.wrappers[params].run(q.contiguous(), (k_cache, v_cache))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # noqa: BLE001
        return "unknown"
