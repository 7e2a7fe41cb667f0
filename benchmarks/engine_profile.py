"""Where a decode step's time goes: ``python -m benchmarks.engine_profile [--model llama8b|tiny]``.

Builds the benchmark's model, one engine per mode, prefills one 128-token prompt, then times decode
steps piece by piece (host clock after a synchronize, and CUDA events around the graph replay
alone), and prints torch.profiler's top ops of a few steps. Notes for the speed issue (#13)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.engine import build_model, model_spec
from detcompile.engine import Engine, SamplingParams
from detcompile.engine.sequence import Sequence


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile_mode(model, dev, deterministic: bool, batch: int, steps: int, out_dir: str,
                 temperature: float = 0.0, top_p: float = 1.0) -> dict:
    eng = Engine(model, max_num_seqs=max(8, batch), chunked_prefill_size=2048, deterministic=deterministic,
                 kv_cache_fraction=0.5, log=lambda m: None)
    mode = "det" if deterministic else "stock"
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        eng.add_request(torch.randint(10, eng.vocab_size, (128,), generator=gen).tolist(),
                        SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=10**5,
                                       ignore_eos=True, seed=i))
    for _ in range(-(-batch * 128 // 2048) + 5):  # every prompt prefilled, then a few decode steps
        eng.step()
    sync(dev)
    parts = {"step": [], "schedule": [], "replay_host": [], "replay_gpu": [], "sample": []}
    runner = eng.runner
    for _ in range(steps):
        t0 = time.perf_counter()
        work = eng.scheduler.schedule()
        t1 = time.perf_counter()
        if dev.type == "cuda" and runner.graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = runner.run(work, [[w.length - 1] for w in work])
            end.record()
        else:
            logits = runner.run(work, [[w.length - 1] for w in work])
        sync(dev)
        t2 = time.perf_counter()
        eng.scheduler.postprocess(work)
        eng._sample(work, logits)
        sync(dev)
        t3 = time.perf_counter()
        parts["schedule"].append(t1 - t0)
        parts["replay_host"].append(t2 - t1)
        if dev.type == "cuda" and runner.graphs:
            parts["replay_gpu"].append(start.elapsed_time(end) / 1e3)
        parts["sample"].append(t3 - t2)
        parts["step"].append(t3 - t0)
    res = {k: round(statistics.median(v) * 1e3, 3) for k, v in parts.items() if v}
    # a whole engine.step, for comparison
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    res["engine.step"] = round(statistics.median(ts) * 1e3, 3)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            eng.step()
        sync(dev)
    for key in ("cpu_time_total", "cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"):
        table = prof.key_averages().table(sort_by=key, row_limit=25)
        with open(os.path.join(out_dir, f"profile_{mode}_b{batch}_{key}.txt"), "w") as f:
            f.write(table)
    print(f"{mode} batch {batch}: " + ", ".join(f"{k} {v} ms" for k, v in res.items()), flush=True)
    # close(), not just `del eng`: `runner` (and `logits`) still held the KV cache and the CUDA graphs
    # here, so the next engine found half the GPU taken.
    eng.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--modes", default="det,stock", help="det, stock or both")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    spec = model_spec(a.model)
    model, _ = build_model(spec)
    for det in [m == "det" for m in a.modes.split(",")]:
        for b in (int(x) for x in a.batches.split(",")):
            profile_mode(model, spec.device, det, b, a.steps, a.out, a.temperature, a.top_p)


if __name__ == "__main__":
    main()
