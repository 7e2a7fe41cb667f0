"""Shared helpers for model tests: batches with a target row among different neighbours."""
from __future__ import annotations

import torch

CAUSAL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "mixtral"]
ALL_ARCHS = CAUSAL_ARCHS + ["bert"]
#: (batch size, neighbours' seed, target row): the target alone, then in the middle and last of
#: batches of 3 and 8 (the last row is the one that reaches a CPU kernel's scalar tail or a ragged
#: last tile; row 0 never does).
BATCHES = ((1, 0, 0), (3, 1, 1), (8, 2, 5), (3, 3, 2), (8, 4, 7))


def batch_with_target(target: torch.Tensor, bs: int, vocab: int, seed: int, row: int | None = None) -> tuple[torch.Tensor, int]:
    """[bs, L] ids: the target at ``row`` (default: the middle), random different neighbours elsewhere."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, vocab, (bs, target.shape[-1]), generator=g)
    row = bs // 2 if row is None else row
    batch[row] = target
    return batch, row


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
