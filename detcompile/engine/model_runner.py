"""Runs the model for one engine step: inputs of the flat batch, the paged KV cache, the compiled
forward and, for decode steps on CUDA, its captured CUDA graphs.

The model is any Hugging Face causal LM whose attention goes through transformers'
``AttentionInterface``. In deterministic mode it is compiled once with
``backend="deterministic"`` (strict) over a dynamic token dimension and warmed up on every graph
Dynamo needs; after that a recompile is an error.

One graph: Dynamo specializes sizes 0 and 1, so a step of one token or one logits row would get
graphs of its own. Steps are padded to at least two tokens and two logits rows instead (a padding
token sits at position 0 of no sequence: it writes the reserved page 0 and attends to nothing).
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
from torch import Tensor

from . import attention
from .scheduler import Work

#: Decode batch sizes captured as CUDA graphs; a step of B one-token rows replays the smallest >= B.
GRAPH_BUCKETS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

_UNPAGEABLE_LAYERS = ("mamba", "linear_attention", "conv", "recurrent", "ssm", "mlstm", "slstm")


def check_pageable(model) -> None:
    """Refuse models the engine cannot page, naming why (the compile backend still serves them)."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"detcompile engine: {cfg.model_type} is an encoder-decoder model; the engine serves "
                         "decoder-only causal LMs (torch.compile(model, backend='deterministic') still works)")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kinds = set(getattr(text, "layer_types", None) or [])
    odd = sorted(k for k in kinds if any(u in str(k).lower() for u in _UNPAGEABLE_LAYERS))
    if odd:
        raise ValueError(f"detcompile engine: {cfg.model_type} has {odd} layers (state-space / hybrid), whose "
                         "state the paged KV cache cannot hold; use torch.compile(model, backend='deterministic')")
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and any(
        hasattr(m, p) for p in ("q_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack"))]
    if not layers:
        raise ValueError(f"detcompile engine: no attention layers with a layer_idx found in {type(model).__name__}; "
                         "the engine needs a transformers model whose attention uses the AttentionInterface")


def kv_geometry(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of the model's attention."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or heads
    if getattr(cfg, "multi_query", False):  # falcon/gpt_bigcode style
        hkv = 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, hkv, head_dim


class ModelRunner:
    def __init__(self, model, *, block_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, deterministic: bool, cuda_graphs: bool,
                 kv_cache_fraction: float, kv_cache_bytes: int | None, log=print):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.deterministic = deterministic
        self.log = log
        check_pageable(model)
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model)
        self.max_pages = -(-max_model_len // block_size)
        attention.register()
        _raise_recompile_limits()
        # The model keeps its own attention outside engine steps (its plain forward still works);
        # each step switches every config it has to the engine's attention.
        self._configs = list({id(m.config): m.config for m in model.modules()
                              if getattr(m, "config", None) is not None}.values())
        t0 = time.perf_counter()
        if deterministic:
            options = {"strict": True}
            if _HAS_GUARD_FILTER:
                options["guard_filter_fn"] = _guard_filter
            self.forward = torch.compile(model, backend="deterministic", dynamic=True, options=options)
        else:
            self.forward = model
        self.warmup()
        self.compile_seconds = time.perf_counter() - t0
        self.num_blocks = self._plan_cache(kv_cache_fraction, kv_cache_bytes)
        shape = (self.num_blocks, block_size, self.num_kv_heads, self.head_dim)
        # zeros, not empty: masked-out slots are never NaN, whatever the kernel does with them
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        self.graphs: dict[int, tuple] = {}
        self.graph_seconds = 0.0
        if cuda_graphs and self.device.type == "cuda":
            t0 = time.perf_counter()
            self.capture_graphs()
            self.graph_seconds = time.perf_counter() - t0

    # -- memory --------------------------------------------------------------------------------
    def page_bytes(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def _plan_cache(self, fraction: float, nbytes: int | None) -> int:
        if nbytes is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                # what the warm-up peaked at above the weights, kept free for activations
                activations = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
                nbytes = int(free - (1 - fraction) * total - activations)
            else:
                nbytes = 256 << 20
        pages = nbytes // self.page_bytes()
        need = self.max_pages + 1
        if pages < need:
            raise ValueError(f"detcompile engine: the KV cache budget ({nbytes / 2**20:.1f} MiB) holds {pages} pages "
                             f"of {self.block_size} tokens; one max_model_len={self.max_model_len} sequence needs {need}")
        self.log(f"detcompile engine: KV cache {pages} pages x {self.block_size} tokens = {pages * self.block_size} "
                 f"tokens, {pages * self.page_bytes() / 2**30:.2f} GiB on {self.device}")
        return int(pages)

    # -- one step ------------------------------------------------------------------------------
    def _call(self, input_ids: Tensor, positions: Tensor, keep: Tensor) -> Tensor:
        guard = torch.compiler.set_stance("fail_on_recompile") if self.deterministic and self.warm else contextlib.nullcontext()
        saved = [c._attn_implementation for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation = attention.IMPLEMENTATION
            with torch.no_grad(), guard:
                out = self.forward(input_ids=input_ids[None], position_ids=positions[None], logits_to_keep=keep,
                                   use_cache=False)
        finally:
            for c, name in zip(self._configs, saved):
                c._attn_implementation = name
        return out.logits[0]

    def prepare(self, work: list[Work], keep_rows: list[list[int]]):
        """Host-side tensors of a step; ``keep_rows[i]`` are the chunk offsets of ``work[i]`` whose
        logits are wanted. Returns (input_ids, positions, keep, StepContext)."""
        ids, pos, slots, keep, chunks = [], [], [], [], []
        bs = self.block_size
        # Only the pages this step reaches: the kernel's result does not depend on the table's width
        # (tiles past a row's length are never visited), and the CPU path gathers the whole width.
        width = max(-(-w.end // self.block_size) for w in work)
        table = torch.zeros((len(work), width), dtype=torch.int32)
        lens = torch.empty(len(work), dtype=torch.int32)
        singles = 0
        for row, w in enumerate(work):
            first = len(ids)
            ids.extend(w.seq.token_at(p) for p in range(w.start, w.end))
            pos.extend(range(w.start, w.end))
            bt = w.seq.block_table
            slots.extend(bt[p // bs] * bs + p % bs for p in range(w.start, w.end))
            table[row, :len(bt)] = torch.tensor(bt, dtype=torch.int32)
            lens[row] = w.end
            keep.extend(first + k for k in keep_rows[row])
            if w.length == 1 and not chunks:
                singles += 1
            else:
                chunks.append((first, w.length, row))
        if len(ids) < 2:  # one token: pad with a second one-token row of no sequence (see the module doc)
            ids.append(0)
            pos.append(0)
            slots.append(0)
            table = torch.cat([table, torch.zeros((1, width), dtype=torch.int32)])
            lens = torch.cat([lens, torch.zeros(1, dtype=torch.int32)])
            singles += 1
        while len(keep) < 2:  # at least two logits rows (a step may want none: a mid-prompt chunk)
            keep.append(keep[-1] if keep else 0)
        dev = self.device
        ctx = attention.StepContext(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_table=table.to(dev, non_blocking=True),
            kv_lens=lens.to(dev, non_blocking=True),
            num_singles=singles,
            chunks=chunks,
        )
        return (torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True),
                torch.tensor(pos, dtype=torch.int64).to(dev, non_blocking=True),
                torch.tensor(keep, dtype=torch.int64).to(dev, non_blocking=True), ctx)

    def run(self, work: list[Work], keep_rows: list[list[int]]) -> Tensor:
        """Logits [sum(len(k) for k in keep_rows), V] (float32) of the wanted rows, in order."""
        n = len(work)
        if self.graphs and all(w.length == 1 for w in work) and all(k == [0] for k in keep_rows) \
                and n <= max(self.graphs):
            return self._replay(work)
        input_ids, positions, keep, ctx = self.prepare(work, keep_rows)
        with attention.step_context(ctx):
            return self._call(input_ids, positions, keep)[: sum(map(len, keep_rows))].float()

    # -- warm-up and CUDA graphs -----------------------------------------------------------------
    warm = False

    def _scratch_context(self, tokens: int, caches) -> attention.StepContext:
        return attention.StepContext(
            kv_caches=caches,
            slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=self.device),
            block_table=torch.zeros((1, self.max_pages), dtype=torch.int32, device=self.device),
            kv_lens=torch.full((1,), tokens, dtype=torch.int32, device=self.device),
            num_singles=0, chunks=[(0, tokens, 0)])

    def warmup(self) -> None:
        """Compile the engine's graph (and measure activation memory) on a scratch cache, then
        check that another size runs without a recompile."""
        shape = (1, self.block_size, self.num_kv_heads, self.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2 for _ in range(self.num_layers)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for tokens in (max(min(self.max_tokens, self.max_model_len), 3), 2):
            with attention.step_context(self._scratch_context(tokens, scratch)):
                self._call(torch.zeros(tokens, dtype=torch.int64, device=self.device),
                           torch.arange(tokens, device=self.device), torch.arange(tokens - 2, tokens, device=self.device))
            self.warm = True

    def capture_graphs(self) -> None:
        """One graph per decode batch size; each has its own static inputs, allocated at their exact
        size (Dynamo guards on a view's base size, so slices of one big buffer would recompile)."""
        dev = self.device
        buckets = [b for b in GRAPH_BUCKETS if b <= self.max_num_seqs]
        if not buckets or buckets[-1] < self.max_num_seqs:
            buckets.append(max(self.max_num_seqs, 2))
        pool = torch.cuda.graph_pool_handle()
        try:
            for b in reversed(buckets):
                inputs = dict(ids=torch.zeros(b, dtype=torch.int64, device=dev),
                              pos=torch.zeros(b, dtype=torch.int64, device=dev),
                              keep=torch.arange(b, device=dev),
                              slots=torch.zeros(b, dtype=torch.int64, device=dev),  # padding rows write page 0
                              table=torch.zeros((b, self.max_pages), dtype=torch.int32, device=dev),
                              lens=torch.zeros(b, dtype=torch.int32, device=dev))
                ctx = attention.StepContext(self.kv_caches, inputs["slots"], inputs["table"], inputs["lens"], b, [])
                with attention.step_context(ctx):
                    self._call(inputs["ids"], inputs["pos"], inputs["keep"])  # warm this size
                    torch.cuda.synchronize(dev)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._call(inputs["ids"], inputs["pos"], inputs["keep"])
                self.graphs[b] = (graph, inputs, logits)
        except RuntimeError as e:  # e.g. a host sync inside the step (MoE group sizes read on the host)
            self.graphs.clear()
            torch.cuda.synchronize(dev)
            warnings.warn(f"detcompile engine: CUDA graphs disabled for {type(self.model).__name__}, decode runs "
                          f"eagerly (same bits, slower): capture failed with: {str(e).splitlines()[0]}", stacklevel=3)
            return
        torch.cuda.synchronize(dev)
        self.log(f"detcompile engine: captured {len(buckets)} decode CUDA graphs (batch {buckets[0]}..{buckets[-1]})")

    def _replay(self, work: list[Work]) -> Tensor:
        n = len(work)
        b = min(k for k in self.graphs if k >= n)
        graph, inputs, logits = self.graphs[b]
        bs = self.block_size
        pad = b - n
        pos = [w.start for w in work]
        ids = [w.seq.token_at(p) for w, p in zip(work, pos)] + [0] * pad
        slots = [w.seq.block_table[p // bs] * bs + p % bs for w, p in zip(work, pos)] + [0] * pad
        lens = [w.end for w in work] + [0] * pad
        table = torch.zeros((b, self.max_pages), dtype=torch.int32)
        for i, w in enumerate(work):
            table[i, :len(w.seq.block_table)] = torch.tensor(w.seq.block_table, dtype=torch.int32)
        ids, pos, slots = (torch.tensor(x, dtype=torch.int64) for x in (ids, pos + [0] * pad, slots))
        lens = torch.tensor(lens, dtype=torch.int32)
        for name, host in (("ids", ids), ("pos", pos), ("slots", slots), ("lens", lens), ("table", table)):
            inputs[name].copy_(host, non_blocking=True)
        graph.replay()
        return logits[:n].float()


def _raise_recompile_limits() -> None:
    """Dynamo counts compiled entries per code object, and every HF model's forward shares a few
    wrapper code objects: a process that builds several engines (tests, a sweep) would hit the
    default limit of 8 and silently run the model eagerly. Each engine needs one entry; after its
    warm-up a recompile is an error anyway (``fail_on_recompile``)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


_HAS_GUARD_FILTER = "guard_filter_fn" in (torch.compile.__doc__ or "")

#: Process-wide registries of transformers that grow whenever another model class is built; a
#: guard on their size would recompile the engine's graph (an error after warm-up) for nothing.
_IGNORED_GLOBALS = ("_CAN_RECORD_REGISTRY",)


def _guard_filter(entries) -> list[bool]:
    return [not (e.is_global and any(g in e.name for g in _IGNORED_GLOBALS)) for e in entries]
