"""Which kernel computes the engine's attention: ``Engine(attention_backend=...)``.

- ``"triton"`` (default): detcompile's own paged kernel (``kernels.paged_attention``), the same
  kernel and bits as the compile backend's attention, on CUDA and (as a reference path) the CPU.
- ``"fa3"``: FlashAttention-3 from ``fa3-fwd`` (``pip install 'detcompile[fa3]'``; Hopper, bf16),
  see ``kernels.attention_fa3``.
- ``"flashinfer"``: FlashInfer from ``flashinfer-python`` (``pip install 'detcompile[flashinfer]'``),
  see ``kernels.attention_flashinfer``.

Every backend is bitwise stable within itself (prefill, chunks, prefix-cache hits, decode, CUDA
graphs, any batch give a token the same bits); the backends' bits differ from each other (other
reduction orders). The backend is fixed per engine: it lives in the runner and in each step's
``StepContext``, never in the op's arguments, so Dynamo sees nothing new.

A backend object (None for "triton") answers:

- ``extra_inputs(host, ragged) -> dict``: host tensors of fixed shape the step needs besides the
  layout (static inputs of a CUDA graph, copied before each replay), named by ``input_names``;
- ``plan(host, ragged, key) -> object``: host work before the forward (``key``: the CUDA graph to be
  captured or replayed, None for an eager step); the result rides in ``StepContext.plan``;
- ``attend(q, k_cache, v_cache, ctx, scale, softcap, window, sinks) -> [T, Hq, Dv]``;
- ``describe() -> str``.
"""
from __future__ import annotations

import torch

NAMES = ("triton", "fa3", "flashinfer")
DEFAULT = "triton"
#: Page size when the caller gives none (FA3 needs one key tile per page, see attention_fa3).
DEFAULT_BLOCK_SIZE = 16


def check_name(name) -> str:
    if name not in NAMES:
        raise ValueError(f"attention_backend must be one of {list(NAMES)}; got {name!r}")
    return name


def default_block_size(name: str, head_dim: int) -> int:
    if check_name(name) == "fa3":
        from ..kernels.attention_fa3 import default_block_size as fa3_block

        return fa3_block(head_dim)
    return DEFAULT_BLOCK_SIZE


def create(name: str, *, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
           block_size: int, max_model_len: int, max_pages: int):
    """The backend object of an engine (None: the Triton kernel). Raises, naming why, when the
    backend's package is missing (``BackendNotInstalledError``, an ImportError) or the device,
    dtype or model is one it cannot run bit-stably (``BackendUnavailableError``)."""
    geometry = dict(device=device, dtype=dtype, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    block_size=block_size, max_model_len=max_model_len)
    if check_name(name) == "fa3":
        from ..kernels.attention_fa3 import FA3Attention

        return FA3Attention(**geometry)
    if name == "flashinfer":
        from ..kernels.attention_flashinfer import FlashInferAttention

        return FlashInferAttention(max_pages=max_pages, **geometry)
    return None
