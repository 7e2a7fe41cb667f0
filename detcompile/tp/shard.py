"""Shard a Hugging Face Llama-style decoder for one rank of a TP group, in place.

Column-parallel (whole output columns per rank, no cross-rank sum): q/k/v by heads, gate/up by
intermediate columns, lm_head by vocabulary rows (then all-gathered: a copy). Row-parallel (K split,
the fixed chunk tree of ``row_parallel``): o_proj and down_proj. Embedding, norms and rotary stay
whole. Every element a rank computes is reduced on that rank in the kernels' own fixed order, except
the row-parallel sums, whose order is fixed by K: the logits have the same bits at every TP size.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops


class RowParallelLinear(nn.Module):
    """This rank's K-slice of an nn.Linear, summed across ranks by ``tp_row_parallel_linear``."""

    def __init__(self, linear: nn.Linear, rank: int, tp: int, group: str):
        super().__init__()
        k = linear.in_features // tp
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * k:(rank + 1) * k].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.rank, self.tp, self.group = rank, tp, group

    def forward(self, x):
        return torch.ops.detcompile.tp_row_parallel_linear(x, self.weight, self.bias, self.rank, self.tp, self.group)


class VocabParallelHead(nn.Module):
    """This rank's vocabulary rows of the lm_head; the logits gathered in rank order."""

    def __init__(self, linear: nn.Linear, rank: int, tp: int, group: str):
        super().__init__()
        self.part = _column_slice(linear, rank, tp)
        self.tp, self.group = tp, group
        self.vocab_size = linear.out_features  # the whole vocabulary (the logits' width)

    def forward(self, x):
        return torch.ops.detcompile.tp_all_gather_last(self.part(x), self.tp, self.group)


def _column_slice(linear: nn.Linear, rank: int, tp: int, lo: int | None = None, n: int | None = None) -> nn.Linear:
    """The output rows [lo, lo + n) of ``linear`` (default: rank's 1/tp share) as a new nn.Linear."""
    n = linear.out_features // tp if n is None else n
    lo = rank * n if lo is None else lo
    out = nn.Linear(linear.in_features, n, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[lo:lo + n])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[lo:lo + n])
    return out.requires_grad_(False)


def shard_llama(model, rank: int, tp: int, group: str = "") -> None:
    """Shard ``model`` (a transformers Llama-style causal LM) in place for ``rank`` of ``tp``."""
    check_shardable(model, tp)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        attn.q_proj = _column_slice(attn.q_proj, rank, tp)
        attn.k_proj = _column_slice(attn.k_proj, rank, tp, rank * kv_heads // tp * d, kv_heads // tp * d)
        attn.v_proj = _column_slice(attn.v_proj, rank, tp, rank * kv_heads // tp * d, kv_heads // tp * d)
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, tp, group)
        mlp.gate_proj = _column_slice(mlp.gate_proj, rank, tp)
        mlp.up_proj = _column_slice(mlp.up_proj, rank, tp)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, tp, group)
    model.lm_head = VocabParallelHead(model.lm_head, rank, tp, group)
    # The rank's own head counts: what the engine's paged KV cache holds per rank (the attention
    # modules reshape with -1 heads, and their query/KV group ratio is unchanged).
    cfg.num_attention_heads, cfg.num_key_value_heads = heads // tp, kv_heads // tp
    cfg.detcompile_tensor_parallel = (rank, tp)


def check_shardable(model, tp: int) -> None:
    """Raise ValueError (changing nothing) unless ``shard_llama`` can shard ``model`` at TP = ``tp``:
    Llama-style layers, and heads, KV heads, intermediate size and vocabulary divisible by ``tp``.
    Works on a meta-device model too (``detcompile serve --tp`` checks before loading any weights)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    _check_llama_style(model)
    cfg = model.config
    for name, n in (("attention heads", cfg.num_attention_heads), ("KV heads", cfg.num_key_value_heads),
                    ("intermediate size", cfg.intermediate_size), ("vocabulary", model.lm_head.out_features)):
        if n % tp:
            raise ValueError(f"detcompile.tp: {name} ({n}) not divisible by TP size {tp}")


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _check_llama_style(model) -> None:
    """Refuse, before anything is changed, a model whose layers are not Llama's (separate q/k/v/o and
    gate/up/down nn.Linear layers, an nn.Linear lm_head)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = layers is not None and isinstance(getattr(model, "lm_head", None), nn.Linear) and all(
        all(isinstance(getattr(getattr(layer, part, None), n, None), nn.Linear) for n in names)
        for layer in layers for part, names in (("self_attn", _ATTN), ("mlp", _MLP)))
    if not ok:
        raise ValueError(f"detcompile.tp: {type(model).__name__} is not a Llama-style causal LM (model.layers with "
                         f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj, an nn.Linear lm_head)")


def shard_for_engine(model, tp: int) -> int:
    """Shard ``model`` for this process's rank of a TP = ``tp`` run (the default process group, already
    initialized with ``tp`` processes: one per rank, e.g. under ``torchrun --nproc-per-node tp``);
    TP = 1 needs no group. Returns the rank."""
    import torch.distributed as dist

    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if getattr(model.config, "detcompile_tensor_parallel", None) is not None:
        raise ValueError("detcompile.tp: this model is already sharded")
    if tp == 1:
        rank = 0
    else:
        if not dist.is_initialized() or dist.get_world_size() != tp:
            raise ValueError(f"tensor_parallel_size={tp} runs one process per rank: call "
                             f"torch.distributed.init_process_group with {tp} processes first (e.g. under "
                             f"torchrun --nproc-per-node {tp}); found "
                             f"{dist.get_world_size() if dist.is_initialized() else 'no'} process group")
        rank = dist.get_rank()
    shard_llama(model, rank, tp)
    return rank
