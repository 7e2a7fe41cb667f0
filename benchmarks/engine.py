"""Engine speed (issues #10 and #13): the detcompile serving engine on a Llama-3-8B-shaped model.

    python -m benchmarks.engine [--model llama8b|tiny] [--parts decode1,throughput,hf,startup] [--out DIR]
                                [--budget-s S] [--deadline-s S] [--concurrency 32,256] [--kv-cache-fraction F]

``--model llama8b`` (default) builds ``LlamaForCausalLM`` with Llama-3-8B's shapes and random bf16
weights directly on the GPU (seeded ``normal_(0, 0.02)``, norms at 1; nothing is downloaded).
``--model tiny`` runs the same code on a tiny random Llama (CPU, or the GPU if there is one) with
small sizes: the CI smoke test.

Parts (each step is timed; a failing step is recorded with its traceback and the others go on):

* ``decode1``: batch-1 decode tokens/s (128-token prompt, 256 new tokens, greedy, ``ignore_eos``),
  deterministic and stock. The decode phase is timed apart from the prefill within each run (the
  request is stepped by hand): from the step that gives the first new token to the last, over 255
  tokens, the median of the repeats (prefix cache flushed before each run). Compared with the
  weight-read roofline: weight bytes / copy bandwidth, where the copy bandwidth is (read + write
  bytes) / time of a 2 GiB device-to-device copy, median of 10 copies timed with CUDA events (the
  host-clock rate of back-to-back copies is recorded beside it).
* ``throughput``: output tokens/s of one wave of 32 and of 256 concurrent requests (prompt lengths
  uniform in 128..2048, output lengths uniform in 128..512, fixed seed; random prompt ids;
  temperature 0.8, top-p 0.95, a seed per request; ``ignore_eos``), deterministic vs
  ``deterministic=False`` in the same engine code. The 32-request wave is the first 32 requests of
  the 256-request one, so in deterministic mode their outputs must be identical (checked). Each
  engine first serves a short warm-up wave (other prompts, 8 new tokens).
* ``hf``: Hugging Face ``generate`` (eager, sdpa) at batch 32, greedy, 128 new tokens, on the same
  prompts as the 32-request wave (cut to their last 1024 tokens, left-padded): the x10 comparison.
* ``startup``: engine start-up (compile + warm-up + CUDA graph capture) of the first engine of the
  process (cold) and of a second deterministic engine on the same model (warm); time to first token
  (``max_new_tokens=1``) for a 128- and a 2048-token prompt.

Engines never coexist: each is freed (``close()``, ``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``)
before the next is built. Order: deterministic engine (cold start-up, TTFT, decode1, throughput),
stock engine (the same), second deterministic engine (warm start-up; its batch-1 greedy tokens must
equal the first one's), HF ``generate``. ``--budget-s`` (default 420 s for llama8b, counted from the
start of the script) skips steps that would not fit, recording why; at ``--deadline-s`` (465 s) a
step still running is interrupted. A run inside an 8-minute limit thus ends with its reports.

Output (``--out``, default ``$OUT`` if set, else ``benchmarks/out``): ``engine_bench.json`` (every
number, the environment, errors, skips and wall times; rewritten after every step, so a killed run
keeps what it measured), ``engine_bench.md`` (tables), ``engine_bench.png`` (matplotlib, the
``bench`` extra; skipped with a warning if missing) and ``engine_bench.log``. The tables are printed
at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import inspect
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

_T_IMPORT = time.perf_counter()  # the CLI's clock starts before torch is imported

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter without a GPU; it must be set before triton.jit runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from detcompile.models import LLAMA3_8B_CONFIG, random_llama  # noqa: E402  (after TRITON_INTERPRET)

PARTS = ("decode1", "throughput", "hf", "startup")
GIB = 2**30

#: Llama-3-8B's shapes (random weights).
LLAMA8B_CONFIG = LLAMA3_8B_CONFIG
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
)

# Targets (issue #10; issue #13's stricter ones beside them).
DECODE1_TARGET = 150.0
DECODE1_TARGET_13 = 200.0
RATIO_TARGET = 0.85
RATIO_TARGET_13 = 0.92
HF_SPEEDUP_TARGET = 10.0


@dataclasses.dataclass
class Sizes:
    """Everything that sets how long a run takes."""

    decode_prompt: int = 128
    decode_new: int = 256
    decode_repeats: int = 3
    concurrency: tuple[int, ...] = (32, 256)
    prompt_range: tuple[int, int] = (128, 2048)
    output_range: tuple[int, int] = (128, 512)
    warmup_requests: int = 16
    warmup_new: int = 8
    hf_batch: int = 32
    hf_new: int = 128
    hf_max_prompt: int = 1024
    ttft_lengths: tuple[int, ...] = (128, 2048)
    ttft_repeats: int = 3
    max_num_seqs: int = 256
    chunked_prefill_size: int = 2048
    kv_cache_fraction: float = 0.85
    kv_cache_bytes: int | None = None  # None: the fraction (GPU); the engine's byte budget on the CPU
    bandwidth_bytes: int = 2 * GIB
    bandwidth_repeats: int = 10
    budget_s: float | None = 420.0  # skip steps that would end past it (None: no limit)
    deadline_s: float | None = 465.0  # a step still running then is interrupted (None: never)
    #: rough seconds per step on the H200, to decide what still fits in the budget
    estimates: dict = dataclasses.field(default_factory=lambda: {
        "engine": 45.0, "decode1": 12.0, "ttft": 5.0, "warmup": 6.0, "throughput_32": 20.0,
        "throughput_256": 70.0, "check": 10.0, "hf": 45.0})


def llama8b_sizes() -> Sizes:
    return Sizes()


def tiny_sizes() -> Sizes:
    return Sizes(decode_prompt=16, decode_new=16, decode_repeats=2, concurrency=(4, 8), prompt_range=(8, 64),
                 output_range=(4, 16), warmup_requests=4, warmup_new=4, hf_batch=4, hf_new=8, hf_max_prompt=48,
                 ttft_lengths=(16, 64), ttft_repeats=2, max_num_seqs=8, chunked_prefill_size=64,
                 kv_cache_bytes=16 << 20, bandwidth_bytes=32 << 20, bandwidth_repeats=5, budget_s=None,
                 deadline_s=None, estimates={})


@dataclasses.dataclass
class ModelSpec:
    name: str
    config: dict
    dtype: torch.dtype
    device: torch.device


def model_spec(name: str) -> ModelSpec:
    cuda = torch.cuda.is_available()
    if name == "llama8b":
        if not cuda:
            raise SystemExit("--model llama8b needs a CUDA GPU (use --model tiny on the CPU)")
        return ModelSpec(name, LLAMA8B_CONFIG, torch.bfloat16, torch.device("cuda"))
    if name == "tiny":
        # float32 on the CPU: bf16 there is slow and not what CI checks
        return ModelSpec(name, TINY_CONFIG, torch.bfloat16 if cuda else torch.float32,
                         torch.device("cuda" if cuda else "cpu"))
    raise SystemExit(f"unknown --model {name!r}: llama8b or tiny")


# ------------------------------------------------------------------------------------------------
# Small helpers.
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def digest(token_lists: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(token_lists).encode()).hexdigest()[:16]


def rnd(x, n: int = 4):
    return round(x, n) if isinstance(x, float) else x


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def default_out() -> str:
    return os.environ.get("OUT") or "benchmarks/out"


# ------------------------------------------------------------------------------------------------
# The run: results, log, budget; every step caught.
# ------------------------------------------------------------------------------------------------


class DeadlineExceeded(Exception):
    """Raised (by SIGALRM) in whatever step is running when ``Sizes.deadline_s`` is reached."""


class Run:
    """Holds the results, writes them after every step, and runs steps so that one failure (or a
    step that would overrun the budget) loses nothing else."""

    def __init__(self, out_dir: Path, sizes: Sizes, quiet: bool = False, t0: float | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sizes = sizes
        self.quiet = quiet
        self.t0 = time.perf_counter() if t0 is None else t0
        self.deadline_hit = False
        self._old_handler = None
        self.log_path = self.out_dir / "engine_bench.log"
        self.log_path.write_text("")
        self.results: dict = {"benchmark": "engine", "errors": {}, "skipped": {}, "wall_seconds": {}, "checks": {}}

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f} s] {msg}"
        if not self.quiet:
            print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def arm_deadline(self) -> None:
        """From ``deadline_s`` on, the running step is interrupted and the rest skipped, so that the
        reports still get written inside the caller's time limit (main thread, POSIX only)."""
        d = self.sizes.deadline_s
        if d is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.deadline_hit = True
            raise DeadlineExceeded(f"hard deadline of {d:.0f} s reached")

        self._old_handler = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, max(d - self.elapsed(), 1.0))

    def disarm_deadline(self) -> None:
        if self._old_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old_handler)
            self._old_handler = None

    def fits(self, name: str, estimate_key: str | None = None) -> bool:
        budget = self.sizes.budget_s
        est = self.sizes.estimates.get(estimate_key or name, 0.0)
        if not self.deadline_hit and (budget is None or self.elapsed() + est <= budget):
            return True
        why = ("deadline reached" if self.deadline_hit else
               f"budget: {self.elapsed():.0f} s elapsed + ~{est:.0f} s estimated > {budget:.0f} s")
        self.results["skipped"][name] = why
        self.log(f"skip {name} ({why})")
        self.save()
        return False

    def step(self, name: str, fn: Callable, estimate_key: str | None = None, device: torch.device | None = None):
        """Run ``fn()``; on failure record the traceback and return None."""
        if not self.fits(name, estimate_key):
            return None
        self.log(f"-- {name}")
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception:  # noqa: BLE001  (one failure must not lose the other parts)
            tb = traceback.format_exc()
            if self.deadline_hit:  # the exception may come wrapped (Dynamo): say what happened last
                tb += f"interrupted at the {self.sizes.deadline_s:.0f} s deadline\n"
            self.results["errors"][name] = tb[-6000:]
            self.log(f"{name} FAILED: {tb.strip().splitlines()[-1]}")
            if device is not None:
                free_memory(device)
            return None
        finally:
            self.results["wall_seconds"][name] = round(time.perf_counter() - t0, 2)
            self.save()

    def save(self) -> None:
        self.results["wall_seconds"]["total"] = round(self.elapsed(), 2)
        path = self.out_dir / "engine_bench.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Environment, model, bandwidth.
# ------------------------------------------------------------------------------------------------


def environment(device: torch.device, argv: list[str]) -> dict:
    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    try:
        from benchmarks.model_sweep import git_commit

        commit = git_commit() or "unknown"
    except Exception:  # noqa: BLE001
        commit = "unknown"
    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join(["python -m benchmarks.engine", *argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"], env["memory_gb"] = props.multi_processor_count, round(props.total_memory / 1e9, 1)
    return env


def build_model(spec: ModelSpec, seed: int = 0):
    """A random-weight Llama built on ``spec.device``: 2-D weights ~ N(0, 0.02), norm weights 1.
    Returns (model, info)."""
    sync(spec.device)
    t0 = time.perf_counter()
    model, how = random_llama(spec.config, spec.dtype, spec.device, seed)
    sync(spec.device)
    params = list({id(p): p for p in model.parameters()}.values())
    embed = model.get_input_embeddings().weight
    info = {
        "name": spec.name,
        "config": spec.config,
        "dtype": str(spec.dtype).replace("torch.", ""),
        "device": str(spec.device),
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        # what a decode step reads: all weights but the input embedding (one row of it)
        "decode_read_bytes": sum(p.numel() * p.element_size() for p in params if p is not embed),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "init": how + " + normal_(0, 0.02)",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    return model, info


def measure_copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> dict:
    """(read + write bytes) / time of ``dst.copy_(src)`` over ``nbytes``: the median of ``repeats``
    copies timed one by one with CUDA events (host clock on the CPU), and the host-clock rate of
    ``repeats`` back-to-back copies."""
    # randn, not zeros: memory compression could make zeros cheaper to move
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    host_s = (time.perf_counter() - t0) / repeats
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory(device)
    med = median(times)
    return {"bytes": moved // 2, "repeats": repeats, "median_seconds": med, "gbps": moved / med / 1e9,
            "gbps_samples": [round(moved / t / 1e9, 1) for t in times], "host_clock_gbps": moved / host_s / 1e9,
            "timing": "CUDA events per copy" if device.type == "cuda" else "host clock per copy"}


# ------------------------------------------------------------------------------------------------
# Workloads.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    seed: int


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                  seed: int) -> list[Request]:
    """``n`` requests with prompt and output lengths uniform in the (inclusive) ranges and random prompt
    ids; the first k requests of a workload are the k-request workload of the same seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        olen = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (plen,), generator=g).tolist()
        out.append(Request(ids, olen, seed * 100_003 + i))
    return out


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def sampled_params(req: Request):
    from detcompile.engine import SamplingParams

    return SamplingParams(temperature=0.8, top_p=0.95, seed=req.seed, max_new_tokens=req.max_new_tokens,
                          ignore_eos=True)


def greedy_params(max_new_tokens: int):
    from detcompile.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True, seed=0)


# ------------------------------------------------------------------------------------------------
# Engine steps.
# ------------------------------------------------------------------------------------------------


def make_engine(run: Run, model, spec: ModelSpec, sizes: Sizes, deterministic: bool):
    from detcompile.engine import Engine

    kw = dict(dtype=spec.dtype, max_num_seqs=sizes.max_num_seqs, chunked_prefill_size=sizes.chunked_prefill_size,
              enable_prefix_caching=True, cuda_graphs=True, deterministic=deterministic)
    if sizes.kv_cache_bytes is not None:
        kw["kv_cache_bytes"] = sizes.kv_cache_bytes
    else:
        kw["kv_cache_fraction"] = sizes.kv_cache_fraction
    if "log" in inspect.signature(Engine.__init__).parameters:
        kw["log"] = run.log
    if spec.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(spec.device)
    sync(spec.device)
    t0 = time.perf_counter()
    engine = Engine(model, **kw)
    sync(spec.device)
    wall = time.perf_counter() - t0
    runner = getattr(engine, "runner", None)
    info = {
        "deterministic": deterministic,
        "wall_seconds": wall,
        "startup_seconds": getattr(engine, "startup_seconds", None),
        "compile_seconds": getattr(runner, "compile_seconds", None),
        "graph_seconds": getattr(runner, "graph_seconds", None),
        "cuda_graphs": len(getattr(runner, "graphs", None) or {}),
    }
    if runner is not None and hasattr(runner, "num_blocks") and hasattr(runner, "block_size"):
        info["kv_cache_tokens"] = int(runner.num_blocks) * int(runner.block_size)
    if spec.device.type == "cuda":
        info["peak_memory_gb"] = torch.cuda.max_memory_allocated(spec.device) / 1e9
    return engine, info


def _flush(engine) -> None:
    flush = getattr(engine, "flush_cache", None)
    if flush is not None:
        flush()


def close_engine(engine) -> None:
    """Free the engine's KV cache and CUDA graphs now, whatever still refers to it (a step's
    traceback, a closure); engines of older commits have no close() and rely on ``del``."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def timed_generate(engine, device, prompts, params, use_tqdm=False):
    _flush(engine)  # every timed run computes its whole prompt
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=use_tqdm)
    sync(device)
    return time.perf_counter() - t0, outs


def timed_decode_run(engine, device, prompt, params) -> tuple[float, float, list[int]]:
    """One request stepped by hand: (seconds to the first new token, seconds from it to the last, tokens).
    Both times come from one run, so the decode time is never a difference of two noisy runs."""
    _flush(engine)  # every timed run computes its whole prompt
    sync(device)
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params)
    seq = engine.requests[rid][0]
    t_first = None
    while not seq.finished:
        engine.step()
        if t_first is None and seq.output:
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    t_end = time.perf_counter()
    tokens = list(engine.pop_output(rid).token_ids)
    return t_first - t0, t_end - t_first, tokens


def bench_decode1(engine, device, sizes: Sizes, vocab: int, seed: int) -> dict:
    """Batch-1 greedy decode: decode seconds = median time from the first new token to the last."""
    prompt = random_prompt(sizes.decode_prompt, vocab, seed)
    n = sizes.decode_new
    timed_generate(engine, device, [prompt], greedy_params(min(8, n)))  # warm the path
    t1s, decode_times, tokens = [], [], None
    for _ in range(sizes.decode_repeats):
        t1, td, toks = timed_decode_run(engine, device, prompt, greedy_params(n))
        t1s.append(t1)
        decode_times.append(td)
        if tokens is not None and toks != tokens:
            raise AssertionError("batch-1 greedy tokens changed between two runs of one engine")
        tokens = toks
    got = len(tokens)
    decode_s = median(decode_times)
    t_all = median(t + d for t, d in zip(t1s, decode_times))
    return {
        "prompt_tokens": len(prompt), "new_tokens": got, "repeats": sizes.decode_repeats,
        "t_first_token_s": median(t1s), "t_all_tokens_s": t_all, "decode_seconds": decode_s,
        "decode_tok_s": (got - 1) / decode_s if got > 1 and decode_s > 0 else None,
        "inter_token_ms": 1e3 * decode_s / (got - 1) if got > 1 else None,
        "end_to_end_tok_s": got / t_all,
        "digest": digest([tokens]), "tokens_head": tokens[:16],
    }


def bench_ttft(engine, device, sizes: Sizes, vocab: int, seed: int) -> dict:
    """Time of ``generate`` with ``max_new_tokens=1`` (prefill + first sample), median of repeats."""
    out = {}
    for length in sizes.ttft_lengths:
        prompt = random_prompt(length, vocab, seed + length)
        timed_generate(engine, device, [prompt], greedy_params(1))  # warm
        times = [timed_generate(engine, device, [prompt], greedy_params(1))[0] for _ in range(sizes.ttft_repeats)]
        out[str(length)] = {"seconds": median(times), "samples": times}
    return out


def bench_throughput_wave(engine, device, requests: list[Request], use_tqdm: bool) -> dict:
    prompts = [r.prompt for r in requests]
    params = [sampled_params(r) for r in requests]
    sched = getattr(engine, "scheduler", None)
    pre0 = getattr(sched, "num_preemptions", None)
    runner = getattr(engine, "runner", None)
    kinds0 = dict(getattr(runner, "step_kinds", {}))
    seconds, outs = timed_generate(engine, device, prompts, params, use_tqdm=use_tqdm)
    tokens = [list(o.token_ids) for o in outs]
    out_tok = sum(len(t) for t in tokens)
    prompt_tok = sum(len(p) for p in prompts)
    rec = {
        "requests": len(requests), "prompt_tokens": prompt_tok, "output_tokens": out_tok,
        "expected_output_tokens": sum(r.max_new_tokens for r in requests), "seconds": seconds,
        "longest_output_tokens": max(r.max_new_tokens for r in requests),
        "output_tok_s": out_tok / seconds, "total_tok_s": (out_tok + prompt_tok) / seconds,
        "digest": digest(tokens), "request_digests": [digest([t]) for t in tokens],
    }
    if pre0 is not None:
        rec["preemptions"] = sched.num_preemptions - pre0
    if runner is not None and hasattr(runner, "step_kinds"):  # steps by kind: decode graph / mixed graph / eager
        rec["steps"] = {k: v - kinds0.get(k, 0) for k, v in runner.step_kinds.items()}
    return rec


def engine_phase(run: Run, model, spec: ModelSpec, sizes: Sizes, parts: set[str], deterministic: bool,
                 label: str, seed: int, workload: list[Request] | None, warmup: list[Request] | None,
                 use_tqdm: bool) -> dict:
    """Build one engine, run the steps of ``parts`` on it, free it. Returns {step: record}."""
    mode = "deterministic" if deterministic else "stock"
    vocab = spec.config["vocab_size"]
    res = run.results
    built = run.step(f"{label}/engine", lambda: make_engine(run, model, spec, sizes, deterministic), "engine",
                     spec.device)
    if built is None:
        return {}
    engine, info = built
    res.setdefault("engines", {})[label] = {k: rnd(v) for k, v in info.items()}
    run.log(f"{label}: start-up {fmt(info['startup_seconds'])} s (compile {fmt(info['compile_seconds'])} s, "
            f"graphs {fmt(info['graph_seconds'])} s)")
    got: dict = {}
    try:
        if "startup" in parts and label != "det_warm":
            r = run.step(f"{label}/ttft", lambda: bench_ttft(engine, spec.device, sizes, vocab, seed + 1), "ttft")
            if r is not None:
                res.setdefault("ttft", {})[mode] = r
        if "decode1" in parts:
            r = run.step(f"{label}/decode1", lambda: bench_decode1(engine, spec.device, sizes, vocab, seed + 2),
                         "check" if label == "det_warm" else "decode1")
            if r is not None:
                got["decode1"] = r
                if label != "det_warm":
                    res.setdefault("decode1", {})[mode] = r
                    run.log(f"{label}: batch-1 decode {fmt(r['decode_tok_s'])} tok/s")
        if "throughput" in parts and workload:
            if warmup:
                run.step(f"{label}/warmup", lambda: engine.generate(
                    [w.prompt for w in warmup], [sampled_params(w) for w in warmup], use_tqdm=False), "warmup")
            for n in sizes.concurrency:
                r = run.step(f"{label}/throughput_{n}",
                             lambda n=n: bench_throughput_wave(engine, spec.device, workload[:n], use_tqdm),
                             f"throughput_{n}")
                if r is not None:
                    res.setdefault("throughput", {}).setdefault(mode, {})[str(n)] = r
                    run.log(f"{label}: {n} requests {fmt(r['output_tok_s'])} output tok/s in {fmt(r['seconds'])} s")
    finally:
        close_engine(engine)
        del engine, built
        free_memory(spec.device)
        if spec.device.type == "cuda":  # what the next engine cannot have (a leak would show here)
            res["engines"][label]["memory_after_free_gb"] = rnd(torch.cuda.memory_allocated(spec.device) / 1e9)
        run.save()
    return got


# ------------------------------------------------------------------------------------------------
# Hugging Face generate.
# ------------------------------------------------------------------------------------------------


def restore_attention(model, impl: str | None) -> None:
    """Undo the engine's attention implementation (HF generate needs a stock one)."""
    impl = impl or "sdpa"
    try:
        model.set_attn_implementation(impl)
    except Exception:  # noqa: BLE001  (older transformers: set the configs directly)
        pass
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", impl) != impl:
            cfg._attn_implementation = impl


def bench_hf(model, spec: ModelSpec, sizes: Sizes, workload: list[Request], attn_impl: str | None) -> dict:
    """HF ``generate`` (eager) at batch ``hf_batch``: greedy, exactly ``hf_new`` new tokens, left padding."""
    restore_attention(model, attn_impl)
    dev, pad = spec.device, 0
    prompts = [r.prompt[-sizes.hf_max_prompt:] for r in workload[:sizes.hf_batch]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)

    def gen(x, m, new):
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        sync(dev)
        return time.perf_counter() - t0, out

    gen(ids[:, -16:], mask[:, -16:].clone().fill_(1), 2)  # warm-up
    t1, _ = gen(ids, mask, 1)
    tn, out = gen(ids, mask, sizes.hf_new)
    new = out.shape[1] - width
    batch = len(prompts)
    return {
        "batch": batch, "prompt_tokens": int(mask.sum()), "padded_width": width, "new_tokens": int(new),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "seconds": tn, "prefill_seconds": t1, "output_tok_s": batch * new / tn,
        "decode_tok_s": batch * (new - 1) / (tn - t1) if tn > t1 else None,
    }


# ------------------------------------------------------------------------------------------------
# Summary: derived numbers, targets, reports.
# ------------------------------------------------------------------------------------------------


def summarize(results: dict, sizes: Sizes) -> None:
    """Derived numbers (roofline, ratios, checks) and the targets, from whatever was measured."""
    bw = results.get("bandwidth") or {}
    info = results.get("model_info") or {}
    d1 = results.get("decode1") or {}
    tp = results.get("throughput") or {}
    hf = results.get("hf") or {}
    det1 = (d1.get("deterministic") or {}).get("decode_tok_s")
    stock1 = (d1.get("stock") or {}).get("decode_tok_s")
    if d1 and bw.get("gbps") and info.get("weight_bytes"):
        roof = bw["gbps"] * 1e9 / info["weight_bytes"]
        d1["roofline_tok_s"] = roof
        d1["roofline_excl_embedding_tok_s"] = bw["gbps"] * 1e9 / info["decode_read_bytes"]
        d1["det_fraction_of_roofline"] = ratio(det1, roof)
        d1["stock_fraction_of_roofline"] = ratio(stock1, roof)
    if d1:
        d1["det_over_stock"] = ratio(det1, stock1)
    det_tp, stock_tp = tp.get("deterministic") or {}, tp.get("stock") or {}
    if tp:
        tp["det_over_stock"] = {n: ratio((det_tp.get(n) or {}).get("output_tok_s"),
                                         (stock_tp.get(n) or {}).get("output_tok_s"))
                                for n in map(str, sizes.concurrency)}
        tp["det_over_hf"] = {n: ratio((det_tp.get(n) or {}).get("output_tok_s"), hf.get("output_tok_s"))
                             for n in map(str, sizes.concurrency)}
        # Upper bound of a wave's rate: it lasts at least as long as its longest request decoding
        # alone at batch-1 speed (prefill and batching can only add to that).
        step_s = ((d1.get("deterministic") or {}).get("inter_token_ms") or 0) / 1e3
        tp["det_over_hf_bound"] = {
            n: ratio(r["output_tokens"] / (r["longest_output_tokens"] * step_s), hf.get("output_tok_s"))
            for n, r in det_tp.items() if step_s and r.get("longest_output_tokens")}
    # checks: the first n requests of the biggest wave are the n-request wave
    checks = results.setdefault("checks", {})
    for mode, recs in (("det", det_tp), ("stock", stock_tp)):
        if recs:
            checks[f"{mode}_every_request_got_max_new_tokens"] = all(
                r["output_tokens"] == r["expected_output_tokens"] for r in recs.values())
        ns = sorted(int(n) for n in recs)
        if len(ns) >= 2:
            small, big = recs[str(ns[0])], recs[str(ns[-1])]
            same = small["request_digests"] == big["request_digests"][:ns[0]]
            checks[f"{mode}_same_tokens_{ns[0]}_vs_{ns[-1]}_concurrent"] = same
    startup = {}
    eng = results.get("engines") or {}
    if "det_cold" in eng:
        startup["cold_seconds"] = eng["det_cold"].get("startup_seconds")
    if "det_warm" in eng:
        startup["warm_seconds"] = eng["det_warm"].get("startup_seconds")
    if "stock" in eng:
        startup["stock_seconds"] = eng["stock"].get("startup_seconds")
    if startup:
        results["startup"] = startup

    targets = []
    judged = results.get("model") == "llama8b"  # the targets are for the 8B model on the H200

    def target(desc, value, goal, spec=".2f"):
        ok = None if value is None or not judged else bool(value >= goal)
        targets.append({"target": desc, "measured": fmt(value, spec), "ok": ok})

    target(f"batch-1 decode >= {DECODE1_TARGET:.0f} tok/s (#10)", det1, DECODE1_TARGET, ".1f")
    target(f"batch-1 decode >= {DECODE1_TARGET_13:.0f} tok/s (#13)", det1, DECODE1_TARGET_13, ".1f")
    target(f"batch-1 det/stock >= {RATIO_TARGET_13} (#13)", d1.get("det_over_stock"), RATIO_TARGET_13)
    for n in map(str, sizes.concurrency):
        r = (tp.get("det_over_stock") or {}).get(n)
        target(f"{n} concurrent: det/stock >= {RATIO_TARGET} (#10)", r, RATIO_TARGET)
        target(f"{n} concurrent: det/stock >= {RATIO_TARGET_13} (#13)", r, RATIO_TARGET_13)
        over_hf = (tp.get("det_over_hf") or {}).get(n)
        if int(n) == max(sizes.concurrency):
            target(f"{n} concurrent det vs HF generate batch {sizes.hf_batch}: >= {HF_SPEEDUP_TARGET:.0f}x (#10)",
                   over_hf, HF_SPEEDUP_TARGET, ".1f")
        else:  # a small wave ends with its longest request alone: report the ratio and what bounds it
            bound = (tp.get("det_over_hf_bound") or {}).get(n)
            targets.append({"target": f"{n} concurrent det vs HF generate batch {sizes.hf_batch} (reported; the "
                                      f"longest request at batch-1 speed bounds it at {fmt(bound, '.1f')}x)",
                            "measured": fmt(over_hf, ".1f"), "ok": None})
    results["targets"] = targets


def render_markdown(results: dict, sizes: Sizes) -> str:
    env = results.get("env") or {}
    info = results.get("model_info") or {}
    bw = results.get("bandwidth") or {}
    d1 = results.get("decode1") or {}
    tp = results.get("throughput") or {}
    hf = results.get("hf") or {}
    lines = [
        f"# Engine benchmark ({info.get('name', '?')})", "",
        f"- date: {env.get('date')}; device: {env.get('device_name')}; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}; commit {env.get('commit')}",
        f"- model: {info.get('params', 0) / 1e9:.3g} B params, {info.get('weight_bytes', 0) / 1e9:.4g} GB "
        f"{info.get('dtype')} (random weights, built in {fmt(info.get('build_seconds'), '.1f')} s)",
        f"- copy bandwidth (read + write, {bw.get('bytes', 0) / GIB:.3g} GiB copy, {bw.get('timing')}): "
        f"{fmt(bw.get('gbps'), '.0f')} GB/s (host clock, back to back: {fmt(bw.get('host_clock_gbps'), '.0f')} GB/s)",
        f"- wall time {fmt((results.get('wall_seconds') or {}).get('total'), '.0f')} s", "",
        f"## Batch-1 decode ({sizes.decode_prompt}-token prompt, {sizes.decode_new} new tokens, greedy)", "",
    ]
    rows = []
    for mode in ("deterministic", "stock"):
        r = d1.get(mode)
        if r:
            rows.append([mode, fmt(r.get("decode_tok_s")), fmt(r.get("inter_token_ms"), ".2f"),
                         fmt(r.get("t_first_token_s") and 1e3 * r["t_first_token_s"], ".1f"),
                         fmt(r.get("end_to_end_tok_s"))])
    if d1.get("roofline_tok_s"):
        rows.append(["weight-read roofline", fmt(d1["roofline_tok_s"]), fmt(1e3 / d1["roofline_tok_s"], ".2f"),
                     "-", "-"])
    lines += [markdown_table(["mode", "decode tok/s", "ms/token", "time to first token ms", "end-to-end tok/s"], rows),
              "", f"det / roofline: {fmt(d1.get('det_fraction_of_roofline'), '.1%')}; det / stock: "
              f"{fmt(d1.get('det_over_stock'), '.3f')}", ""]
    lines += [f"## Throughput (prompts {sizes.prompt_range[0]}-{sizes.prompt_range[1]}, outputs "
              f"{sizes.output_range[0]}-{sizes.output_range[1]} tokens, temperature 0.8, top-p 0.95)", ""]
    rows = []
    for n in map(str, sizes.concurrency):
        det = (tp.get("deterministic") or {}).get(n) or {}
        st = (tp.get("stock") or {}).get(n) or {}
        rows.append([n, fmt(det.get("output_tok_s"), ".0f"), fmt(st.get("output_tok_s"), ".0f"),
                     fmt((tp.get("det_over_stock") or {}).get(n), ".3f"),
                     fmt((tp.get("det_over_hf") or {}).get(n), ".3g"),
                     f"{fmt(det.get('seconds'))} / {fmt(st.get('seconds'))}"])
    lines += [markdown_table(["concurrent requests", "det output tok/s", "stock output tok/s", "det/stock",
                              "det/HF", "wall s (det / stock)"], rows), ""]
    if hf:
        lines += [f"HF `generate` eager, batch {hf.get('batch')}, {hf.get('new_tokens')} new tokens, greedy, prompts "
                  f"cut to {sizes.hf_max_prompt} tokens and left-padded to {hf.get('padded_width')}: "
                  f"{fmt(hf.get('output_tok_s'), '.0f')} output tok/s ({fmt(hf.get('decode_tok_s'), '.0f')} tok/s "
                  f"decode only), {fmt(hf.get('seconds'))} s", ""]
    st = results.get("startup") or {}
    ttft = results.get("ttft") or {}
    if st or ttft:
        lines += ["## Start-up and time to first token", ""]
        rows = [[k.replace("_seconds", ""), fmt(v)] for k, v in st.items()]
        for mode, recs in ttft.items():
            for length, rec in recs.items():
                rows.append([f"TTFT {mode}, {length}-token prompt", fmt(rec.get("seconds"), ".3f")])
        lines += [markdown_table(["what", "seconds"], rows), ""]
    if results.get("checks"):
        lines += ["## Checks", "", markdown_table(["check", "result"], [[k, v] for k, v in results["checks"].items()]),
                  ""]
    if results.get("targets"):
        note = [] if results.get("model") == "llama8b" else ["(judged only for --model llama8b)", ""]
        lines += ["## Targets", "", *note, markdown_table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "-"}[t["ok"]]]
             for t in results["targets"]]), ""]
    for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
        if results.get(key):
            lines += [f"## {title}", ""] + [f"- {k}: {v.strip().splitlines()[-1]}" for k, v in results[key].items()] + [""]
    return "\n".join(lines)


def write_plot(results: dict, sizes: Sizes, path: Path) -> bool:
    """Bars: throughput det / stock (and HF) per concurrency; batch-1 decode vs the roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the [bench] extra; the tables still get written
        warnings.warn(f"no plot ({e}); pip install -e '.[bench]' for {path.name}")
        return False
    tp = results.get("throughput") or {}
    d1 = results.get("decode1") or {}
    hf = results.get("hf") or {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    ns = list(map(str, sizes.concurrency))
    w = 0.38
    for k, (mode, color) in enumerate((("deterministic", "#2e7d32"), ("stock", "#9e9e9e"))):
        vals = [((tp.get(mode) or {}).get(n) or {}).get("output_tok_s") or 0.0 for n in ns]
        bars = ax1.bar([i + (k - 0.5) * w for i in range(len(ns))], vals, w, label=mode, color=color)
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ticks = [f"{n} concurrent" for n in ns]
    if hf.get("output_tok_s"):
        bars = ax1.bar([len(ns)], [hf["output_tok_s"]], w, label=f"HF generate (batch {hf['batch']})", color="#c62828")
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
        ticks.append("HF eager")
    ax1.set_xticks(range(len(ticks)), ticks)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput", fontsize=10)
    ax1.legend(fontsize=8)
    labels, vals, colors = [], [], []
    for label, v, c in (("det", (d1.get("deterministic") or {}).get("decode_tok_s"), "#2e7d32"),
                        ("stock", (d1.get("stock") or {}).get("decode_tok_s"), "#9e9e9e"),
                        ("roofline", d1.get("roofline_tok_s"), "#1565c0")):
        if v:
            labels.append(label), vals.append(v), colors.append(c)
    bars = ax2.bar(labels, vals, color=colors)
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
    ax2.axhline(DECODE1_TARGET, ls="--", color="k", lw=0.8)
    ax2.set_ylabel("tokens/s")
    ax2.set_title("batch-1 decode vs weight-read roofline", fontsize=10)
    env = results.get("env") or {}
    fig.suptitle(f"detcompile engine, {results.get('model_info', {}).get('name')} on {env.get('device_name')} "
                 f"({env.get('date')}, torch {env.get('torch')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_reports(run: Run, sizes: Sizes, plot: bool = True) -> str:
    """JSON, markdown and (``plot``) PNG from what was measured so far; returns the markdown."""
    summarize(run.results, sizes)
    run.save()
    md = render_markdown(run.results, sizes)
    png = run.out_dir / "engine_bench.png"
    if plot:
        try:
            if write_plot(run.results, sizes, png):
                md += f"\n![engine benchmark]({png.name})\n"
        except Exception:  # noqa: BLE001
            run.results["errors"]["plot"] = traceback.format_exc()[-3000:]
    (run.out_dir / "engine_bench.md").write_text(md)
    run.save()
    return md


# ------------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------------


def run_benchmark(model_name: str = "llama8b", parts=PARTS, out_dir: str | Path | None = None,
                  sizes: Sizes | None = None, seed: int = 0, argv: list[str] | None = None,
                  quiet: bool = False, t0: float | None = None) -> dict:
    """Run the benchmark; returns the results dict (also in ``<out_dir>/engine_bench.json``)."""
    parts = set(parts)
    bad = parts - set(PARTS)
    if bad:
        raise ValueError(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    spec = model_spec(model_name)
    sizes = sizes or (llama8b_sizes() if model_name == "llama8b" else tiny_sizes())
    run = Run(Path(out_dir or default_out()), sizes, quiet=quiet, t0=t0)
    res = run.results
    res["model"] = model_name
    res["parts"] = sorted(parts)
    res["sizes"] = {k: v for k, v in dataclasses.asdict(sizes).items() if k != "estimates"}
    res["env"] = environment(spec.device, argv if argv is not None else sys.argv[1:])
    run.log(f"engine benchmark: {model_name} on {res['env']['device_name']}, parts {sorted(parts)}, out {run.out_dir}")
    run.arm_deadline()
    try:
        _run_parts(run, spec, sizes, parts, seed, quiet)
    except DeadlineExceeded as e:  # raised between steps: the steps themselves catch it
        res["errors"]["deadline"] = str(e)
        run.log(str(e))
    finally:
        run.disarm_deadline()
        free_memory(spec.device)
        md = write_reports(run, sizes)
    run.log(f"done in {run.elapsed():.0f} s; reports in {run.out_dir}")
    if not quiet:
        print("\n" + md, flush=True)
    return res


def _run_parts(run: Run, spec: ModelSpec, sizes: Sizes, parts: set[str], seed: int, quiet: bool) -> None:
    res = run.results
    import detcompile  # noqa: F401  (registers the ops and the backend)

    built = run.step("build_model", lambda: build_model(spec, seed), device=spec.device)
    if built is None:
        run.log("no model, nothing to measure")
        return
    model, info = built
    del built
    res["model_info"] = info
    run.log(f"model: {info['params'] / 1e9:.3g} B params, {info['weight_bytes'] / 1e9:.4g} GB, "
            f"built in {info['build_seconds']:.1f} s ({info['init']})")
    if "decode1" in parts:
        bw = run.step("bandwidth", lambda: measure_copy_bandwidth(spec.device, sizes.bandwidth_bytes,
                                                                  sizes.bandwidth_repeats), device=spec.device)
        if bw is not None:
            res["bandwidth"] = bw
            run.log(f"copy bandwidth {bw['gbps']:.0f} GB/s (events), {bw['host_clock_gbps']:.0f} GB/s (host clock)")

    vocab = spec.config["vocab_size"]
    workload = warmup = None
    if "throughput" in parts or "hf" in parts:
        workload = make_workload(max(max(sizes.concurrency), sizes.hf_batch), sizes.prompt_range, sizes.output_range,
                                 vocab, seed + 10)
        warmup = make_workload(sizes.warmup_requests, sizes.prompt_range,
                               (sizes.warmup_new, sizes.warmup_new), vocab, seed + 20)
    use_tqdm = not quiet
    engine_parts = parts & {"decode1", "throughput", "startup"}
    det = {}
    if engine_parts:
        det = engine_phase(run, model, spec, sizes, engine_parts, True, "det_cold", seed, workload, warmup, use_tqdm)
        write_reports(run, sizes, plot=False)
    if engine_parts & {"decode1", "throughput"}:
        engine_phase(run, model, spec, sizes, engine_parts, False, "stock", seed, workload, warmup, use_tqdm)
        write_reports(run, sizes, plot=False)
    if "startup" in parts:
        warm = engine_phase(run, model, spec, sizes, engine_parts, True, "det_warm", seed, None, None, use_tqdm)
        if "decode1" in det and "decode1" in warm:
            same = det["decode1"]["digest"] == warm["decode1"]["digest"]
            res["checks"]["det_batch1_tokens_same_in_second_engine"] = same
        write_reports(run, sizes, plot=False)
    if "hf" in parts:
        attn = info.get("attn_implementation")
        r = run.step("hf", lambda: bench_hf(model, spec, sizes, workload, attn), "hf", spec.device)
        if r is not None:
            res["hf"] = r
            run.log(f"HF generate batch {r['batch']}: {r['output_tok_s']:.0f} output tok/s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama8b", choices=["llama8b", "tiny"])
    p.add_argument("--parts", nargs="+", default=list(PARTS),
                   help=f"some of {', '.join(PARTS)} (comma- or space-separated; default all)")
    p.add_argument("--out", default=None, help="output folder (default $OUT if set, else benchmarks/out)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip steps that would end past this many seconds (default 420 for llama8b, none for "
                        "tiny; 0: none)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="interrupt the step still running at this many seconds and write the reports (default "
                        "465 for llama8b, none for tiny; 0: none)")
    p.add_argument("--concurrency", default=None, help="comma-separated request counts (default 32,256)")
    p.add_argument("--kv-cache-fraction", type=float, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="engine token budget per step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    parts = [x for item in args.parts for x in item.split(",") if x]
    sizes = llama8b_sizes() if args.model == "llama8b" else tiny_sizes()
    if args.budget_s is not None:
        sizes.budget_s = args.budget_s if args.budget_s > 0 else None
    if args.deadline_s is not None:
        sizes.deadline_s = args.deadline_s if args.deadline_s > 0 else None
    if args.concurrency:
        sizes.concurrency = tuple(int(x) for x in args.concurrency.split(","))
        sizes.max_num_seqs = max(sizes.max_num_seqs, *sizes.concurrency)
    if args.kv_cache_fraction is not None:
        sizes.kv_cache_fraction = args.kv_cache_fraction
    if args.chunked_prefill_size is not None:
        sizes.chunked_prefill_size = args.chunked_prefill_size
    return run_benchmark(args.model, parts, args.out, sizes, args.seed, argv, t0=_T_IMPORT)


if __name__ == "__main__":
    main()
