"""Shared helpers for model tests: batches with a target row among different neighbours."""
from __future__ import annotations

import torch

CAUSAL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "mixtral"]
ALL_ARCHS = CAUSAL_ARCHS + ["bert"]
TARGET_ROW = {1: 0, 3: 1, 8: 5}


def batch_with_target(target: torch.Tensor, bs: int, vocab: int, seed: int) -> tuple[torch.Tensor, int]:
    """[bs, L] ids: the target at row TARGET_ROW[bs], random different neighbours elsewhere."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, vocab, (bs, target.shape[-1]), generator=g)
    row = TARGET_ROW.get(bs, bs // 2)
    batch[row] = target
    return batch, row


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
