"""Decode-shape matmul configs (GPU): which small-M launch config streams the weights fastest.

    python -m benchmarks.matmul_small_m [--ms 2,8,16] [--out DIR]

At M <= 16 a matmul is a weight read: the time is bytes / bandwidth. For each Llama-3-8B weight
(x @ W.t(), W [N, K] as nn.Linear holds it) and each M, every candidate config of the pointer
kernel (BLOCK_M 16, BLOCK_N, warps, stages, persistent or one program per tile; BLOCK_K stays the
dtype's, so the K reduction and the bits do not change) is timed under a CUDA graph against
``F.linear`` (cuBLAS), with enough weight copies cycled that L2 never holds them. Every config's
output must equal the default config's bit for bit; a config that differs is reported and never
chosen. Prints a table per M and writes ``matmul_small_m.json``: the evidence behind
``matmul.select_config`` for M <= 16.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from detcompile.kernels import matmul as mm

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [dict(BLOCK_N=bn, num_warps=w, num_stages=s, PERSISTENT=p)
           for bn, w, s, p in itertools.product((16, 32, 64, 128), (2, 4), (4, 8, 12), (True, False))]


def time_graph(fn, copies, reps=5, calls=20) -> float:
    """Seconds per call: a CUDA graph of ``calls`` calls cycling through ``copies``."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for c in copies:
            fn(c)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(copies[i % len(copies)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="2,8,16")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    results = []
    for name, (N, K) in SHAPES.items():
        wbytes = N * K * 2
        n_copies = max(1, -(-(256 << 20) // wbytes))
        ws = [torch.randn(N, K, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(n_copies)]
        for M in (int(m) for m in a.ms.split(",")):
            x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.bfloat16)
            ref = mm.triton_matmul(x, ws[0].t())
            default = mm.select_config(M, N, torch.bfloat16, torch.cuda.get_device_properties(dev).multi_processor_count)
            t_cublas = time_graph(lambda w: F.linear(x, w), ws)
            t_default = time_graph(lambda w: mm.triton_matmul(x, w.t()), ws)
            rows = []
            for cfg in CONFIGS:
                c = dict(cfg, BLOCK_M=16, TMA=False)
                try:
                    out = mm.triton_matmul(x, ws[0].t(), _config=c)
                    same = torch.equal(out, ref)
                    t = time_graph(lambda w: mm.triton_matmul(x, w.t(), _config=c), ws)
                except Exception as e:  # a config Triton cannot build (registers, shared memory)
                    rows.append(dict(cfg, error=str(e).splitlines()[0][:120]))
                    continue
                rows.append(dict(cfg, seconds=t, same_bits=same, gbps=wbytes / t / 1e9))
            ok = [r for r in rows if r.get("same_bits")]
            best = min(ok, key=lambda r: r["seconds"])
            bad = [r for r in rows if r.get("same_bits") is False]
            rec = dict(shape=name, N=N, K=K, M=M, cublas_s=t_cublas, default_s=t_default,
                       default={k: default[k] for k in ("BLOCK_N", "num_warps", "num_stages")},
                       best=best, differing_bits=len(bad), configs=rows)
            results.append(rec)
            print(f"{name:8s} M={M:3d}: cuBLAS {wbytes / t_cublas / 1e9:6.0f} GB/s, default {wbytes / t_default / 1e9:6.0f} "
                  f"GB/s ({t_default * 1e6:6.1f} us), best {best['gbps']:6.0f} GB/s ({best['seconds'] * 1e6:6.1f} us) "
                  f"BN={best['BLOCK_N']} w={best['num_warps']} st={best['num_stages']} pers={best['PERSISTENT']}; "
                  f"configs with other bits: {len(bad)}", flush=True)
        del ws
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "matmul_small_m.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
