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

import collections
import contextlib
import itertools
import time
import warnings

import numpy as np
import torch
from torch import Tensor

from ..kernels.paged_attention import max_varlen_tiles, varlen_block_m, varlen_tiles
from . import attention, attention_backends
from .scheduler import Work

#: Decode batch sizes captured as CUDA graphs; a step of B one-token rows replays the smallest >= B.
GRAPH_BUCKETS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
#: Token counts of steps with prefill chunks captured as CUDA graphs (up to the step budget); a
#: step of T tokens replays the smallest bucket >= T, its padding tokens in no row.
MIXED_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)

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
                 kv_cache_fraction: float, kv_cache_bytes: int | None, attention_backend: str = "triton",
                 log=print):
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
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.group = text.num_attention_heads // self.num_kv_heads  # query heads per KV head
        self.block_m = varlen_block_m(self.head_dim, self.head_dim, self.dtype)  # rows per ragged-launch tile
        self.max_pages = -(-max_model_len // block_size)
        # Before compiling: a backend that cannot run here fails now, naming why.
        self.attention_backend = attention_backends.check_name(attention_backend)
        self.backend = attention_backends.create(
            attention_backend, device=self.device, dtype=self.dtype, num_heads=text.num_attention_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, block_size=block_size,
            max_model_len=max_model_len, max_pages=self.max_pages)
        if self.backend is not None:
            log(f"detcompile engine: attention backend {self.backend.describe()}")
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
        self.graphs: dict[int, tuple] = {}  # decode batch -> (graph, static inputs, logits, key)
        self.mixed_graphs: dict[int, tuple] = {}  # step tokens -> (graph, static inputs, logits, key)
        self.step_kinds = collections.Counter()  # "decode graph" / "mixed graph" / "eager" steps run
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
                # mem_get_info counts the caching allocator's unused blocks as taken: memory a freed
                # engine left there (``del eng`` without empty_cache) would shrink this budget.
                torch.cuda.empty_cache()
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

    def close(self) -> None:
        """Free the KV cache, the CUDA graphs (their static buffers and memory pool), the attention
        backend's buffers and the compiled forward now, even while something still holds the runner
        (a caller's ``runner = engine.runner``, a traceback). Idempotent."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing queued still reads or writes what is freed
        self.graphs.clear()
        self.mixed_graphs.clear()
        self.kv_caches = []
        self.backend = None
        self.forward = self.model = None  # the compiled wrapper; the model, if the engine loaded it
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # back to the driver: the next engine sizes its cache by mem_get_info

    # -- one step ------------------------------------------------------------------------------
    def _call(self, input_ids: Tensor, positions: Tensor, keep: Tensor) -> Tensor:
        guard = torch.compiler.set_stance("fail_on_recompile") if self.deterministic and self.warm else contextlib.nullcontext()
        saved = [c._attn_implementation for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation = attention.IMPLEMENTATION
            with torch.no_grad(), guard, _specialized_floats():
                out = self.forward(input_ids=input_ids[None], position_ids=positions[None], logits_to_keep=keep,
                                   use_cache=False)
        finally:
            for c, name in zip(self._configs, saved):
                c._attn_implementation = name
        return out.logits[0]

    def layout(self, work: list[Work], keep_rows: list[list[int]], ragged: bool, graph: tuple | None = None) -> dict:
        """Host (CPU) tensors of a step; ``keep_rows[i]`` are the chunk offsets of ``work[i]`` whose
        logits are wanted. A decode layout (``ragged=False``) has one token per row; a ragged one
        any number, with the rows' query ranges and the kernel's tile list. ``graph`` = (tokens,
        rows, keep rows, tiles) pads everything to a CUDA graph's static inputs: padding tokens
        belong to no row (ragged: zeros out of attention) or to rows of no keys (decode), sit at
        position 0 and write the reserved page 0."""
        bs = self.block_size
        n = len(work)
        # Whole-batch numpy over flat lists, not per-row numpy calls: at 256 decode rows the per-row
        # version took ~1.6 ms of host time a step, during which the GPU waited.
        lengths = np.fromiter((w.length for w in work), np.int64, n)
        first = np.cumsum(lengths) - lengths  # each row's first token
        T = int(lengths.sum())
        tok_row = np.repeat(np.arange(n), lengths)
        pos = np.repeat(np.fromiter((w.start for w in work), np.int64, n), lengths) + np.arange(T) - first[tok_row]
        pages = np.fromiter((len(w.seq.block_table) for w in work), np.int64, n)
        flat = np.fromiter(itertools.chain.from_iterable(w.seq.block_table for w in work), np.int64, int(pages.sum()))
        page_row = np.repeat(np.arange(n), pages)
        page_col = np.arange(flat.shape[0]) - np.repeat(np.cumsum(pages) - pages, pages)
        keep = [int(first[i]) + r for i, rows in enumerate(keep_rows) for r in rows]
        if graph is None:  # at least two tokens and two logits rows (see the module doc)
            tokens = max(T, 2)
            n_rows = n if ragged else tokens
            n_keep = max(len(keep), 2)
            width = max(-(-w.end // bs) for w in work)
        else:
            tokens, n_rows, n_keep, n_tiles = graph
            width = self.max_pages
        out = dict(ids=np.zeros(tokens, np.int64), pos=np.zeros(tokens, np.int64), slots=np.zeros(tokens, np.int64),
                   keep=np.full(n_keep, keep[-1] if keep else 0, np.int64),
                   table=np.zeros((n_rows, width), np.int32), lens=np.zeros(n_rows, np.int32))
        out["table"][page_row, page_col] = flat
        out["ids"][:T] = np.fromiter(itertools.chain.from_iterable(w.seq.token_slice(w.start, w.end) for w in work),
                                     np.int64, T)
        out["pos"][:T] = pos
        if (pos // bs >= pages[tok_row]).any():
            raise IndexError("a token's position lies past its sequence's block table")
        out["slots"][:T] = out["table"][tok_row, pos // bs].astype(np.int64) * bs + pos % bs
        out["keep"][:len(keep)] = keep
        out["lens"][:n] = np.fromiter((w.end for w in work), np.int64, n)
        starts = first.tolist()
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        if ragged:
            q_lens = [w.length for w in work]
            out["q_start"] = torch.zeros(n_rows, dtype=torch.int32)
            out["q_start"][:n] = torch.tensor(starts, dtype=torch.int32)
            out["q_lens"] = torch.zeros(n_rows, dtype=torch.int32)
            out["q_lens"][:n] = torch.tensor(q_lens, dtype=torch.int32)
            out["tiles"] = varlen_tiles(q_lens, self.group, self.block_m, None if graph is None else n_tiles,
                                        None if graph is None else n)
        if self.backend is not None:
            out.update(self.backend.extra_inputs(out, ragged))
        return out

    def context(self, inputs: dict, plan=None, kv_caches=None) -> attention.StepContext:
        extra = {name: inputs[name] for name in self.backend.input_names} if self.backend is not None else {}
        return attention.StepContext(self.kv_caches if kv_caches is None else kv_caches, inputs["slots"],
                                     inputs["table"], inputs["lens"], inputs.get("q_start"), inputs.get("q_lens"),
                                     inputs.get("tiles"), backend=self.backend, extra=extra, plan=plan)

    def _plan(self, host: dict, ragged: bool, key=None):
        """The backend's host-side work for a step laid out in ``host`` (FlashInfer: its plan)."""
        return None if self.backend is None else self.backend.plan(host, ragged, key)

    def run(self, work: list[Work], keep_rows: list[list[int]]) -> Tensor:
        """Logits [sum(len(k) for k in keep_rows), V] (float32) of the wanted rows, in order."""
        n, tokens, wanted = len(work), sum(w.length for w in work), sum(map(len, keep_rows))
        ragged = any(w.length > 1 for w in work)
        if not ragged and self.graphs and all(k == [0] for k in keep_rows) and n <= max(self.graphs):
            self.step_kinds["decode graph"] += 1
            return self._replay(self.graphs[min(b for b in self.graphs if b >= n)], work, keep_rows, False, n)
        if ragged:
            for size in sorted(self.mixed_graphs):
                entry = self.mixed_graphs[size]
                if size >= tokens and entry[1]["keep"].shape[0] >= wanted and entry[1]["lens"].shape[0] > n:
                    self.step_kinds["mixed graph"] += 1
                    return self._replay(entry, work, keep_rows, True, wanted)
        self.step_kinds["eager"] += 1
        host = self.layout(work, keep_rows, ragged)
        plan = self._plan(host, ragged)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        with attention.step_context(self.context(inputs, plan)):
            return self._call(inputs["ids"], inputs["pos"], inputs["keep"])[:wanted].float()

    def _replay(self, entry, work: list[Work], keep_rows: list[list[int]], ragged: bool, wanted: int) -> Tensor:
        graph, inputs, logits, key = entry
        sizes = (inputs["ids"].shape[0], inputs["lens"].shape[0], inputs["keep"].shape[0],
                 inputs["tiles"].shape[1] if ragged else 0)
        host = self.layout(work, keep_rows, ragged, sizes)
        for name, value in host.items():
            inputs[name].copy_(value, non_blocking=True)
        # FlashInfer: re-plan into the buffers the captured kernel reads. Its plan stages through a
        # pinned buffer with an async copy; the previous step's copy has run, since every step
        # ends with its tokens on the host.
        self._plan(host, ragged, key)
        graph.replay()
        return logits[:wanted].float()

    # -- warm-up and CUDA graphs -----------------------------------------------------------------
    warm = False

    def warmup(self) -> None:
        """Compile the engine's graph (and measure activation memory) on a scratch cache, then
        check that another size runs without a recompile."""
        shape = (1, self.block_size, self.num_kv_heads, self.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2 for _ in range(self.num_layers)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        dev = self.device
        for tokens in (max(min(self.max_tokens, self.max_model_len), 3), 2):
            # one row of `tokens` queries over the scratch page (every page index 0)
            host = dict(ids=torch.zeros(tokens, dtype=torch.int64), pos=torch.arange(tokens),
                        slots=torch.zeros(tokens, dtype=torch.int64), keep=torch.arange(tokens - 2, tokens),
                        table=torch.zeros((1, self.max_pages), dtype=torch.int32),
                        lens=torch.full((1,), tokens, dtype=torch.int32), q_start=torch.zeros(1, dtype=torch.int32),
                        q_lens=torch.full((1,), tokens, dtype=torch.int32),
                        tiles=varlen_tiles([tokens], self.group, self.block_m))
            if self.backend is not None:
                host.update(self.backend.extra_inputs(host, True))
            plan = self._plan(host, True)
            inputs = {k: v.to(dev) for k, v in host.items()}
            with attention.step_context(self.context(inputs, plan, kv_caches=scratch)):
                self._call(inputs["ids"], inputs["pos"], inputs["keep"])
            self.warm = True

    def _capture(self, sizes: tuple, ragged: bool, pool, key) -> tuple:
        """One CUDA graph over static inputs of ``sizes`` (tokens, rows, keep rows, tiles), each
        allocated at its exact size (Dynamo guards on a view's base size, so slices of one big buffer
        would recompile). Zeros are a valid empty step: no row has keys or queries. ``key`` names
        the graph to the attention backend (FlashInfer plans a wrapper of fixed buffers per graph)."""
        tokens, rows, keep, tiles = sizes
        z = lambda *shape, dtype=torch.int32: torch.zeros(shape, dtype=dtype)  # noqa: E731
        host = dict(ids=z(tokens, dtype=torch.int64), pos=z(tokens, dtype=torch.int64),
                    slots=z(tokens, dtype=torch.int64), keep=z(keep, dtype=torch.int64),
                    table=z(rows, self.max_pages), lens=z(rows))
        if ragged:
            host.update(q_start=z(rows), q_lens=z(rows), tiles=z(2, tiles))
        if self.backend is not None:
            host.update(self.backend.extra_inputs(host, ragged))
        inputs = {k: v.to(self.device) for k, v in host.items()}
        with attention.step_context(self.context(inputs, self._plan(host, ragged, key))):
            self._call(inputs["ids"], inputs["pos"], inputs["keep"])  # warm this size
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._call(inputs["ids"], inputs["pos"], inputs["keep"])
        return graph, inputs, logits, key

    def capture_graphs(self) -> None:
        """Decode graphs: one per batch bucket (one token per row). Mixed graphs: one per token
        bucket up to the step budget, for steps with prefill chunks (ragged rows)."""
        buckets = [b for b in GRAPH_BUCKETS if b <= self.max_num_seqs]
        if not buckets or buckets[-1] < self.max_num_seqs:
            buckets.append(max(self.max_num_seqs, 2))
        mixed = sorted({t for t in MIXED_BUCKETS if t < self.max_tokens} | {max(self.max_tokens, 2)})
        pool = torch.cuda.graph_pool_handle()
        try:
            for b in reversed(buckets):
                self.graphs[b] = self._capture((b, b, b, 0), False, pool, ("decode", b))
            for t in reversed(mixed):
                rows = min(t, self.max_num_seqs)
                sizes = (t, rows + 1, rows, max_varlen_tiles(t, rows + 1, self.group, self.block_m))
                self.mixed_graphs[t] = self._capture(sizes, True, pool, ("mixed", t))
        except RuntimeError as e:  # e.g. a host sync inside the step (MoE group sizes read on the host)
            self.graphs.clear()
            self.mixed_graphs.clear()
            torch.cuda.synchronize(self.device)
            warnings.warn(f"detcompile engine: CUDA graphs disabled for {type(self.model).__name__}, steps run "
                          f"eagerly (same bits, slower): capture failed with: {str(e).splitlines()[0]}", stacklevel=3)
            return
        torch.cuda.synchronize(self.device)
        self.log(f"detcompile engine: captured {len(buckets)} decode CUDA graphs (batch {buckets[0]}..{buckets[-1]}) "
                 f"and {len(mixed)} mixed-step graphs ({mixed[0]}..{mixed[-1]} tokens)")


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


def _specialized_floats():
    """Float attributes (a norm's ``eps``) as constants of the graph, as a static compile sees them.
    Under ``dynamic=True`` Dynamo would lift them into graph inputs, which hides the RMSNorm pattern
    from the rms_norm pass: the engine would run the generic mean instead of the trainer's rms_norm
    kernel, whose sum over a row longer than 2048 adds in another order (other bits)."""
    cfg = torch._dynamo.config
    return cfg.patch(specialize_float=True) if hasattr(cfg, "specialize_float") else contextlib.nullcontext()


_HAS_GUARD_FILTER = "guard_filter_fn" in (torch.compile.__doc__ or "")

#: Process-wide registries of transformers that grow whenever another model class is built; a
#: guard on their size would recompile the engine's graph (an error after warm-up) for nothing.
_IGNORED_GLOBALS = ("_CAN_RECORD_REGISTRY",)


def _guard_filter(entries) -> list[bool]:
    return [not (e.is_global and any(g in e.name for g in _IGNORED_GLOBALS)) for e in entries]
