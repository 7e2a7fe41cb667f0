"""What is measured: the shapes of a full and a quick run."""
from __future__ import annotations

import dataclasses


#: Llama-3-8B weights as nn.Linear stores them: (N, K) = (out_features, in_features).
MATMUL_SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The shapes of one run (the tests use a tiny one on the CPU)."""

    matmul_shapes: dict = dataclasses.field(default_factory=lambda: dict(MATMUL_SHAPES))
    matmul_ms: tuple = (1, 16, 64, 256, 1024, 4096, 8192)
    norm_widths: tuple = (4096, 128256)
    norm_tokens: tuple = (1, 64, 1024, 8192)
    prefill_cases: tuple = ((1, 1024), (4, 1024), (1, 4096), (1, 8192))  # (batch, tokens)
    decode_kv_lens: tuple = (1024, 4096, 16384, 32768)
    decode_batches: tuple = (1, 8, 32, 64, 128, 256)
    decode_max_cache_bytes: int = 40 * 10**9  # K + V; larger cells are skipped
    sdpa_decode_max_batch: int = 64  # the contiguous SDPA reference needs a second copy of the cache
    page_size: int = 16
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    copy_bytes: int = 1 << 30


FULL_GRID = Grid()
QUICK_GRID = dataclasses.replace(
    FULL_GRID,
    matmul_ms=(1, 64, 1024, 8192),
    norm_tokens=(1, 1024, 8192),
    prefill_cases=((1, 1024), (4, 1024), (1, 8192)),
    decode_kv_lens=(1024, 32768),
    decode_batches=(1, 32, 256),
)
