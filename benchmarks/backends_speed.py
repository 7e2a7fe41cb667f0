"""Speed of the engine's attention backends (issue #14): ``python -m benchmarks.backends_speed``.

    python -m benchmarks.backends_speed [--model llama8b|tiny] [--backends triton,fa3,flashinfer] [--out DIR]

One deterministic engine per backend (CUDA graphs on) on the engine benchmark's model, built one after
another on the same weights (each freed before the next), and per backend:

* ``attention``: the attention kernels' GPU time inside eager engine steps (the CUDA graphs set aside
  so that torch.profiler names every kernel): a prefill of one 2048-token prompt (one chunk) and decode
  steps of 1 and 32 requests at a 2048-token context. Kernels are counted as attention when their name
  matches ``ATTENTION_KERNEL`` (the top kernels of each step are recorded, so the match can be
  checked). Decode is compared with its bandwidth floor (the K and V bytes each step must read, at the
  measured copy bandwidth), prefill with its causal FLOPs.
* ``decode1``: batch-1 greedy decode tokens/s (128-token prompt, 256 new tokens), CUDA graphs.
* ``throughput``: output tokens/s of 32 and 256 concurrent requests after a warm-up wave, the same
  workloads as ``benchmarks.engine`` (prompts 128-2048, outputs 128-512, temperature 0.8, top-p 0.95).

Output (``--out``, default ``$OUT`` or ``benchmarks/out``): ``backends_speed.json``, ``.md`` and ``.png``.
A backend whose package is missing is recorded as skipped with the error; a failing step is recorded
with its error and the others go on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import traceback
from pathlib import Path

import torch

from benchmarks.engine import (bench_decode1, bench_throughput_wave, build_model, close_engine, free_memory,
                               llama8b_sizes, make_workload, markdown_table, measure_copy_bandwidth, model_spec,
                               random_prompt, sampled_params, sync, tiny_sizes)

#: Kernel names of the three backends' attention (ours: _attention_kernel and _merge_splits_kernel;
#: FA3: flash_fwd...; FlashInfer: BatchPrefill.../BatchDecode... kernels) and, on the CPU, the op.
ATTENTION_KERNEL = re.compile(r"attention|attn|flash|BatchPrefill|BatchDecode|merge_splits|paged", re.I)
CONTEXT = 2048
DECODE_BATCHES = (1, 32)
PROFILED_STEPS = 3


def _params(new: int):
    from detcompile.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True, seed=0)


def _attention_times(prof, cuda: bool) -> tuple[dict, dict]:
    """(attention kernels, all kernels): microseconds per name from a torch.profiler run."""
    every: dict[str, float] = {}
    for ev in prof.key_averages():
        us = (ev.device_time_total if cuda else ev.self_cpu_time_total) or 0.0
        if us > 0 and (cuda or ev.key.startswith("detcompile::")):
            every[ev.key[:120]] = every.get(ev.key[:120], 0.0) + us
    return {k: v for k, v in every.items() if ATTENTION_KERNEL.search(k)}, every


def _profiled_eager_steps(engine, steps: int) -> tuple[dict, dict]:
    """Profile ``steps`` engine steps run eagerly (CUDA graphs set aside, so every kernel is named)."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    cuda = runner.device.type == "cuda"
    saved = runner.graphs, runner.mixed_graphs
    runner.graphs, runner.mixed_graphs = {}, {}
    try:
        sync(runner.device)
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
            sync(runner.device)
    finally:
        runner.graphs, runner.mixed_graphs = saved
    return _attention_times(prof, cuda)


def _finish_all(engine) -> None:
    while engine.has_unfinished():
        engine.step()
    for rid in list(engine.requests):
        engine.pop_output(rid)


def bench_attention(engine, vocab: int, context: int, layers: int, kv_bytes_per_token_layer: int,
                    q_heads: int, head_dim: int, gbps: float | None) -> dict:
    """Attention kernels' time in a prefill step of one ``context``-token prompt (median of 3) and in
    decode steps of 1 and 32 requests at that context."""
    out = {}
    runs = []
    for rep in range(4):  # the first is a warm-up of the eager prefill path
        engine.flush_cache()
        engine.add_request(random_prompt(context, vocab, 100 + rep), _params(1))
        att, every = _profiled_eager_steps(engine, 1)
        _finish_all(engine)
        if rep:
            runs.append((sum(att.values()), att, every))
    runs.sort(key=lambda r: r[0])
    us, att, every = runs[len(runs) // 2]
    flops = 2 * 2 * (context * (context + 1) / 2) * q_heads * head_dim * layers  # QK^T and PV, causal half
    out["prefill"] = {
        "tokens": context, "attention_us": us, "attention_us_per_layer": us / layers,
        "tflops": flops / (us * 1e-6) / 1e12 if us else None, "step_kernels_us": sum(every.values()),
        "attention_kernels": {k: round(v, 2) for k, v in att.items()},
        "top_kernels": [[k, round(v, 2)] for k, v in sorted(every.items(), key=lambda kv: -kv[1])[:6]],
    }
    for batch in DECODE_BATCHES:
        engine.flush_cache()
        # Enough new tokens that no request ends while the others are still prefilling (one prompt a step).
        new = engine.max_model_len - context - 1
        rids = [engine.add_request(random_prompt(context, vocab, 1000 + i), _params(new)) for i in range(batch)]
        while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
            engine.step()
        decoding = sum(s.is_decoding for s in engine.scheduler.running)
        if decoding != batch:
            raise AssertionError(f"{decoding} of {batch} requests decoding when the profile starts")
        _profiled_eager_steps(engine, 1)  # warm the eager decode path (not counted)
        att, every = _profiled_eager_steps(engine, PROFILED_STEPS)
        for rid in rids:
            engine.abort(rid)
        _finish_all(engine)
        us = sum(att.values()) / PROFILED_STEPS
        kv_bytes = batch * (context + 2) * kv_bytes_per_token_layer * layers  # keys read by the profiled steps
        floor_us = kv_bytes / (gbps * 1e9) * 1e6 if gbps else None
        out[f"decode_{batch}"] = {
            "batch": batch, "context": context, "attention_us": us, "attention_us_per_layer": us / layers,
            "floor_us": floor_us, "fraction_of_floor": floor_us / us if floor_us and us else None,
            "step_kernels_us": sum(every.values()) / PROFILED_STEPS,
            "attention_kernels": {k: round(v / PROFILED_STEPS, 2) for k, v in att.items()},
            "top_kernels": [[k, round(v / PROFILED_STEPS, 2)]
                            for k, v in sorted(every.items(), key=lambda kv: -kv[1])[:6]],
        }
    return out


def run_backend(name: str, model, spec, sizes, gbps: float | None, parts: set[str], log) -> dict:
    from detcompile.engine import Engine

    cfg = spec.config
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    elem = torch.finfo(spec.dtype).bits // 8
    rec: dict = {"backend": name, "errors": {}}
    t0 = time.perf_counter()
    try:
        kw = dict(max_num_seqs=max(sizes.max_num_seqs, *DECODE_BATCHES),
                  chunked_prefill_size=sizes.chunked_prefill_size, cuda_graphs=True, deterministic=True,
                  attention_backend=name, log=lambda m: None)
        if sizes.kv_cache_bytes is not None:
            kw["kv_cache_bytes"] = sizes.kv_cache_bytes
        else:
            kw["kv_cache_fraction"] = sizes.kv_cache_fraction
        engine = Engine(model, **kw)
    except Exception as e:  # noqa: BLE001  (a backend not installed or not supported: recorded)
        rec["skipped"] = f"{type(e).__name__}: {e}"
        log(f"[{name}] skipped: {rec['skipped']}")
        return rec
    rec["startup_s"] = time.perf_counter() - t0
    rec["describe"] = engine.runner.backend.describe() if engine.runner.backend is not None else "triton"
    rec["block_size"] = engine.runner.block_size
    vocab = cfg["vocab_size"]
    context = min(CONTEXT, sizes.prompt_range[1])
    steps = [
        ("attention", lambda: bench_attention(engine, vocab, context, layers, 2 * kv_heads * head_dim * elem, heads,
                                              head_dim, gbps)),
        ("decode1", lambda: bench_decode1(engine, spec.device, sizes, vocab, 2)),
        ("throughput", lambda: _throughput(engine, spec.device, sizes)),
    ]
    try:
        for step, fn in steps:
            if step not in parts:
                continue
            t1 = time.perf_counter()
            try:
                rec[step] = fn()
                log(f"[{name}] {step} done in {time.perf_counter() - t1:.1f} s")
            except Exception:  # noqa: BLE001  (recorded; the other steps still run)
                rec["errors"][step] = traceback.format_exc(limit=8)
                log(f"[{name}] {step} FAILED:\n{rec['errors'][step]}")
                _finish_all(engine)
    finally:
        close_engine(engine)
        del engine
        free_memory(spec.device)
    return rec


WORKLOAD: list = []
WARMUP: list = []


def _throughput(engine, device, sizes) -> dict:
    engine.generate([w.prompt for w in WARMUP], [sampled_params(w) for w in WARMUP], use_tqdm=False)
    return {str(n): bench_throughput_wave(engine, device, WORKLOAD[:n], False) for n in sizes.concurrency}


def render(results: dict) -> str:
    rows_att, rows_e2e = [], []
    for b, r in results["backends"].items():
        if "skipped" in r:
            rows_att.append([b, f"skipped: {r['skipped'][:100]}", "", "", "", "", ""])
            continue
        a = r.get("attention") or {}
        pre, d1, d32 = a.get("prefill") or {}, a.get(f"decode_{DECODE_BATCHES[0]}") or {}, \
            a.get(f"decode_{DECODE_BATCHES[-1]}") or {}

        def f(x, spec=".1f"):
            return "-" if x is None else format(x, spec)

        rows_att.append([b, f(pre.get("attention_us_per_layer")), f(pre.get("tflops"), ".0f"),
                         f(d1.get("attention_us_per_layer")), f(d1.get("fraction_of_floor"), ".0%"),
                         f(d32.get("attention_us_per_layer")), f(d32.get("fraction_of_floor"), ".0%")])
        tp = r.get("throughput") or {}
        rows_e2e.append([b, f((r.get("decode1") or {}).get("decode_tok_s")),
                         *[f((tp.get(str(n)) or {}).get("output_tok_s"), ".0f") for n in results["concurrency"]],
                         f(r.get("startup_s"))])
    env = results["env"]
    return "\n".join([
        f"# Attention backends: speed ({env['device']}, {env['date']})", "",
        f"Model: {results['model']}; copy bandwidth {results.get('gbps') or 0:.0f} GB/s; context {results['context']}.",
        "Attention time: GPU time of the attention kernels in eager engine steps (torch.profiler), per layer.", "",
        markdown_table(["backend", "prefill us/layer", "prefill TFLOP/s", f"decode b={DECODE_BATCHES[0]} us/layer",
                        "of floor", f"decode b={DECODE_BATCHES[-1]} us/layer", "of floor"], rows_att), "",
        "End to end (CUDA graphs):", "",
        markdown_table(["backend", "batch-1 decode tok/s",
                        *[f"{n} concurrent out tok/s" for n in results["concurrency"]], "start-up s"], rows_e2e), "",
    ])


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    names = [b for b, r in results["backends"].items() if "skipped" not in r]
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = ["prefill", *[f"decode_{b}" for b in DECODE_BATCHES]]
    width = 0.8 / len(names)
    for i, b in enumerate(names):
        a = results["backends"][b].get("attention") or {}
        vals = [(a.get(k) or {}).get("attention_us_per_layer") or 0 for k in keys]
        axes[0].bar([j + i * width for j in range(len(keys))], vals, width, label=b)
        tp = results["backends"][b].get("throughput") or {}
        tvals = [(tp.get(str(n)) or {}).get("output_tok_s") or 0 for n in results["concurrency"]]
        axes[1].bar([j + i * width for j in range(len(tvals))], tvals, width, label=b)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    axes[0].set_ylabel("attention us per layer (lower is better)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(results["concurrency"]))],
                       [f"{n} concurrent" for n in results["concurrency"]])
    axes[1].set_ylabel("output tokens/s (higher is better)")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"Attention backends, {results['model']} ({results['env']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama8b", choices=["llama8b", "tiny"])
    ap.add_argument("--backends", default="triton,fa3,flashinfer")
    ap.add_argument("--parts", default="attention,decode1,throughput")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(args.model)
    sizes = llama8b_sizes() if args.model == "llama8b" else tiny_sizes()

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    model, info = build_model(spec)
    gbps = None
    if spec.device.type == "cuda":
        gbps = measure_copy_bandwidth(spec.device, sizes.bandwidth_bytes, sizes.bandwidth_repeats)["gbps"]
    WORKLOAD[:] = make_workload(max(sizes.concurrency), sizes.prompt_range, sizes.output_range,
                                spec.config["vocab_size"], 10)  # the engine benchmark's workload (seed 0 + 10)
    WARMUP[:] = make_workload(sizes.warmup_requests, sizes.prompt_range, (sizes.warmup_new, sizes.warmup_new),
                              spec.config["vocab_size"], 20)  # and its warm-up wave
    results = {
        "model": args.model, "gbps": gbps, "context": min(CONTEXT, sizes.prompt_range[1]),
        "concurrency": list(sizes.concurrency), "model_info": {k: v for k, v in info.items() if k != "config"},
        "env": {"device": torch.cuda.get_device_name() if spec.device.type == "cuda" else "cpu",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__},
        "backends": {},
    }
    for name in args.backends.split(","):
        log(f"[{name}] building the engine")
        results["backends"][name] = run_backend(name, model, spec, sizes, gbps, set(args.parts.split(",")), log)
        (out / "backends_speed.json").write_text(json.dumps(results, indent=1, default=str))
    md = render(results)
    (out / "backends_speed.md").write_text(md)
    plot(results, out / "backends_speed.png")
    print(md)
    return results


if __name__ == "__main__":
    main()
