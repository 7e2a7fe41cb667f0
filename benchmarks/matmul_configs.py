"""Matmul launch-config study (GPU): which configs give the same bits, and which is fastest where.

    python -m benchmarks.matmul_configs [--out DIR]

The matmul kernel may pick its tile config by M only if every candidate config computes every
output element with the same bits (same K chunking into MMA instructions, same accumulation order).
This script checks that empirically against the reference config (bf16, fp16, fp32/tf32 and
fp32/ieee; K = 4096 and 14336; a ragged K too) and times each config on the issue-#3 grid
(Llama-3-8B shapes x M) against cuBLAS, under CUDA graphs. It prints both tables and writes
``configs.json`` under ``--out``. It is the evidence behind ``matmul._BUCKETS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
MS = (1, 16, 64, 256, 1024, 4096, 8192)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, tma). The first is the reference.
CANDIDATES = [
    (128, 128, 64, 8, 3, False),
    # large M
    (128, 256, 64, 8, 3, False),
    (128, 256, 64, 8, 3, True),
    (256, 128, 64, 8, 3, True),
    (128, 128, 64, 8, 4, True),
    (128, 128, 64, 4, 4, True),
    (128, 128, 128, 8, 3, True),
    # medium M
    (64, 128, 64, 4, 4, True),
    (128, 64, 64, 4, 4, True),
    (64, 256, 64, 8, 3, True),
    (128, 128, 64, 8, 3, True),
    # M around 64
    (64, 64, 128, 4, 4, False),
    (64, 64, 128, 4, 4, True),
    (64, 64, 64, 4, 8, True),
    (64, 32, 64, 4, 8, True),
    (32, 64, 64, 4, 8, True),
    # small M
    (16, 32, 128, 4, 4, False),
    (16, 32, 128, 4, 4, True),
    (16, 32, 64, 4, 8, False),
    (16, 32, 64, 4, 8, True),
    (16, 64, 64, 4, 8, True),
    (16, 128, 64, 4, 6, True),
    (16, 64, 128, 4, 4, True),
    (16, 128, 128, 4, 3, True),
    (16, 32, 128, 2, 5, True),
    (16, 64, 256, 4, 3, True),
    (16, 64, 64, 4, 8, False),
]


def _cfg(c):
    bm, bn, bk, w, s, tma = c[:6]
    persistent = c[6] if len(c) > 6 else True
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, TMA=tma, PERSISTENT=persistent)


def _name(c):
    return ("x".join(map(str, c[:3])) + f"_w{c[3]}s{c[4]}" + ("_tma" if c[5] else "")
            + ("_np" if len(c) > 6 and not c[6] else ""))


# Mid-M study (M = 256/512 with N <= 8192 is where waves of big tiles leave SMs idle).
MID_CANDIDATES = [
    (128, 128, 64, 4, 4, True),
    (128, 128, 64, 8, 3, True),
    (128, 64, 64, 4, 4, True),
    (128, 64, 64, 4, 5, True),
    (64, 128, 64, 4, 4, True),
    (64, 128, 64, 4, 5, True),
    (64, 64, 64, 4, 6, True),
    (128, 128, 64, 4, 3, True, False),
    (128, 64, 64, 4, 3, True, False),
    (64, 128, 64, 4, 3, True, False),
    (64, 64, 64, 4, 4, True, False),
    (128, 256, 64, 8, 3, True),
    # deeper pipelines (2026-11-24: 128x128 w4 s6 took qkv M=256 from 0.78x to 0.91x cuBLAS).
    # Tried the same day and dropped: Hopper warp specialization (tl.range(warp_specialize=True),
    # 8 warps: 0.51-0.77x) and two-part 96/192-column tiles (two accumulators: 0.34-0.57x).
    (128, 128, 64, 4, 5, True),
    (128, 128, 64, 4, 6, True),
    (64, 64, 64, 4, 6, True, False),
    (64, 128, 64, 4, 5, True, False),
    (128, 256, 64, 8, 4, True),
    (64, 64, 64, 4, 8, True, False),
    (64, 128, 64, 4, 6, True),
    (64, 128, 64, 4, 6, True, False),
    (128, 64, 64, 4, 6, True),
    # M = 64 (N = 4096 gives only 64 tiles of 64x64)
    (64, 64, 64, 4, 8, True),
    (64, 32, 64, 4, 8, True),
    (64, 32, 64, 4, 10, True),
    (64, 32, 64, 4, 8, True, False),
]


def mid_m_table(mm, copies=4, shapes=("qkv", "o", "down"), ms=(256, 512)):
    """Time MID_CANDIDATES at M in ``ms`` for the N <= 8192 shapes, cycling over weight copies
    so the weights do not sit in L2 (as in a real model)."""
    from triton.testing import do_bench_cudagraph
    out = {}
    for sname in shapes:
        N, K = SHAPES[sname]
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for M in ms:
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            flops = 2.0 * M * N * K * copies

            def run_all(fn):
                return lambda: [fn(w) for w in ws]

            t = do_bench_cudagraph(run_all(lambda w: torch.mm(a, w.t())), rep=20)
            row = {"cublas_tflops": flops / t / 1e9}
            want = mm(a, ws[0].t(), _config=_cfg(CANDIDATES[0]))
            for c in MID_CANDIDATES:
                try:
                    assert torch.equal(mm(a, ws[0].t(), _config=_cfg(c)), want), "bits differ"
                    t = do_bench_cudagraph(run_all(lambda w: mm(a, w.t(), _config=_cfg(c))), rep=20)
                    row[_name(c)] = flops / t / 1e9
                except Exception as e:
                    row[_name(c)] = None
                    print("  ", _name(c), type(e).__name__, str(e)[:200])
            cb = row["cublas_tflops"]
            ranked = sorted(((v / cb, k) for k, v in row.items() if k != "cublas_tflops" and v), reverse=True)
            print(f"{sname:5s} M={M}: cublas {cb:6.1f} | " + " ".join(f"{k}:{r:.2f}" for r, k in ranked[:6]), flush=True)
            out[f"{sname}/M{M}"] = row
        del ws
        torch.cuda.empty_cache()
    return out


def _candidates_for(M):
    if M <= 16:
        return [c for c in CANDIDATES if c[0] == 16]
    if M <= 64:
        return [c for c in CANDIDATES if c[0] <= 64]
    return [c for c in CANDIDATES if c[0] >= 64]


def bitwise_table(mm):
    """For each candidate: does it equal the reference config's output, per dtype/K?"""
    ref = CANDIDATES[0]
    cases = []
    for dt, prec in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, "high"),
                     (torch.float32, "highest")):
        for K in ((4096, 1000) if dt != torch.float32 else (1000,)):
            cases.append((dt, prec, K))
    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt, prec, K in cases:
        if prec:
            torch.set_float32_matmul_precision(prec)
        a = torch.randn(64, K, device="cuda", generator=g).to(dt)
        w = torch.randn(1024, K, device="cuda", generator=g).to(dt)
        want = mm(a, w.t(), _config=_cfg(ref))
        key = f"{str(dt).split('.')[-1]}{'/' + prec if prec else ''}/K{K}"
        for c in CANDIDATES[1:]:
            try:
                got = mm(a, w.t(), _config=_cfg(c))
                ok = bool(torch.equal(got, want))
                # Row 0 alone through the same config (M=1 launch).
                ok1 = bool(torch.equal(mm(a[:1], w.t(), _config=_cfg(c)), want[:1]))
                res.setdefault(_name(c), {})[key] = "ok" if ok and ok1 else ("DIFF" if not ok else "DIFF-M1")
            except Exception as e:  # out of resources etc.
                res.setdefault(_name(c), {})[key] = f"err:{type(e).__name__}:{str(e)[:300]}"
        torch.set_float32_matmul_precision("highest")
    return res


def timing_table(mm):
    from triton.testing import do_bench_cudagraph
    out = {}
    for sname, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        a_all = torch.randn(max(MS), K, device="cuda", dtype=torch.bfloat16)
        for M in MS:
            a = a_all[:M]
            flops = 2.0 * M * N * K
            t_cublas = do_bench_cudagraph(lambda: torch.mm(a, w.t()), rep=20)
            row = {"cublas_tflops": flops / t_cublas / 1e9}
            for c in _candidates_for(M):
                try:
                    t = do_bench_cudagraph(lambda: mm(a, w.t(), _config=_cfg(c)), rep=20)
                    row[_name(c)] = flops / t / 1e9
                except Exception as e:
                    row[_name(c)] = None
            best = max((k for k in row if k != "cublas_tflops" and row[k]), key=lambda k: row[k])
            row["best"] = best
            row["best_ratio"] = row[best] / row["cublas_tflops"]
            out[f"{sname}/M{M}"] = row
            print(f"{sname:8s} M={M:5d} cublas {row['cublas_tflops']:7.1f}  best {best:24s} "
                  f"{row[best]:7.1f}  ratio {row['best_ratio']:.3f}  ref {row.get(_name(CANDIDATES[0])) or 0:7.1f}",
                  flush=True)
        del w, a_all
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--mid-only", action="store_true", help="only the mid-M study")
    ap.add_argument("--mid-shapes", default="qkv,o,down", help="shapes of the mid-M study")
    ap.add_argument("--mid-ms", default="256,512", help="M values of the mid-M study")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.matmul_configs needs a CUDA GPU")
    from detcompile.kernels.matmul import triton_matmul as mm
    if args.mid_only:
        mid = mid_m_table(mm, shapes=args.mid_shapes.split(","), ms=[int(m) for m in args.mid_ms.split(",")])
        with open(os.path.join(args.out, "configs_mid.json"), "w") as f:
            json.dump(mid, f, indent=1)
        return
    bits = bitwise_table(mm)
    for name, row in bits.items():
        bad = {k: v for k, v in row.items() if v != "ok"}
        print(f"{name:24s} {'all ok' if not bad else bad}", flush=True)
    times = {} if args.skip_timing else timing_table(mm)
    with open(os.path.join(args.out, "configs.json"), "w") as f:
        json.dump({"bitwise": bits, "timing": times}, f, indent=1)


if __name__ == "__main__":
    main()
