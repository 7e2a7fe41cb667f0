"""When should paged decode split a row's keys over programs? (GPU; issue #13)

    python -m benchmarks.decode_split_schedule [--batches 1,2,4,8,16,32,64,128] [--contexts 512,...]
                                               [--splits 128,256,512] [--stages 2,3,4] [--out DIR]

Our decode kernel reduces a row's keys in fixed ``SPLIT``-key splits folded in ascending order;
whether the splits run in one program (a loop) or in parallel programs plus a merge kernel changes
the schedule only, never the bits (checked here for every cell). ``_want_parallel_splits`` splits
only when the grid has fewer programs than SMs; on the H200 the engine's decode at batch 32 and a
2048-token context (256 programs, two waves of long programs) ran at 55% of the bandwidth floor
(benchmarks/backends_speed.py, 2026-12-03). This times both schedules over batch x context
(Llama-3-8B heads: 32 q / 8 kv, head dim 128, bf16, pages of 16) against the floor (K and V bytes at
the measured copy bandwidth) and prints the programs/SM ratio where splitting starts to lose:
the evidence for the rule.

``--splits`` also tries other split sizes. SPLIT is part of every row's reduction order (prefill
folds its splits in-program too), so changing it changes the bits of all attention (still invariant:
it is a constant); a smaller one gives short-context decode at small batch more programs (batch 1 at
2048 keys: 32 programs on 132 SMs with 512-key splits). For each split size this also times causal
prefill (batch 1, 2048 and 8192 tokens), the cost side.

``--stages`` tries the decode tile (64 rows, 64 keys, 4 warps) at other pipeline depths: only how
far ahead K/V tiles are loaded changes, so each must give the default depth's bits (checked).
``--tiles`` tries other row tiles as ROWSxWARPS (16 rows a warp, as the default 64x4: the layout that
gives prefill's row order; a GQA group of 4 at decode fills 4 of the 64 rows): e.g. 32x2, 16x1, each
at every depth, bits checked against the default tile.
Writes ``decode_split_schedule.json`` (after every row: a crash keeps what was measured).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

HQ, HKV, D, PAGE = 32, 8, 128, 16


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--splits", default=None, help="split sizes to try (default: the kernel's SPLIT)")
    ap.add_argument("--stages", default=None, help="decode tile pipeline depths to try (default: the kernel's)")
    ap.add_argument("--tiles", default=None, help="row tiles ROWSxWARPS to try (default: the kernel's, 64x4)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.decode_split_schedule needs a CUDA GPU")
    from triton.testing import do_bench_cudagraph

    from benchmarks.kernels.bandwidth import measure_copy_bandwidth
    from benchmarks.kernels.timing import GraphTimer
    from detcompile.kernels import _common
    from detcompile.kernels import attention_triton as AT
    from detcompile.kernels import paged_attention as P

    dev, dt = torch.device("cuda"), torch.bfloat16
    sms = _common.num_sms(dev)
    bw = measure_copy_bandwidth(GraphTimer(), dev, 1 << 30)["gbps"]
    rows, prefill = [], []
    splits = [int(x) for x in args.splits.split(",")] if args.splits else [AT.SPLIT]
    base = AT.tile_config(D, dt, rows=HQ // HKV)  # the decode tile
    depths = [int(x) for x in args.stages.split(",")] if args.stages else [base[3]]
    tiles = ([tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")] if args.tiles
             else [(base[0], base[2])])
    os.makedirs(args.out, exist_ok=True)
    print(f"copy bandwidth {bw:.0f} GB/s, {sms} SMs, kernel SPLIT {AT.SPLIT}")
    print(f"{'split':>5} {'batch':>5} {'ctx':>6} {'programs/SM':>11} {'loop us':>8} {'split us':>8} {'floor us':>8} "
          f"{'best % floor':>12} {'auto':>5} bits")
    for sk in splits:
        for n in map(int, args.contexts.split(",")):
            for B in map(int, args.batches.split(",")):
                pages = B * -(-n // PAGE)
                kc, vc = (torch.randn(pages, PAGE, HKV, D, device=dev, dtype=dt) for _ in range(2))
                bt = torch.randperm(pages, device=dev, dtype=torch.int32).reshape(B, -1)
                kl = torch.full((B,), n, device=dev, dtype=torch.int32)
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
                outs, times = {}, {}
                AT._TILE_OVERRIDE = None
                ref = P.triton_paged_attention(q, kc, vc, bt, kl, _parallel_splits=False, _split=sk).view(torch.int16)
                for (bm, warps), depth in itertools.product(tiles, depths):
                    cfg = (bm, base[1], warps, depth)
                    AT._TILE_OVERRIDE = cfg if cfg != tuple(base) else None
                    for par in (False, True):
                        f = lambda p=par: P.triton_paged_attention(q, kc, vc, bt, kl, _parallel_splits=p,  # noqa: E731
                                                                   _split=sk)
                        outs[bm, warps, depth, par] = f()
                        times[bm, warps, depth, par] = do_bench_cudagraph(f, rep=20) * 1e3  # us
                AT._TILE_OVERRIDE = None
                same = all(torch.equal(o.view(torch.int16), ref) for o in outs.values())
                by_depth = {f"{bm}x{w}/{d}/{'split' if p else 'loop'}": t for (bm, w, d, p), t in times.items()}
                times = {par: min(t for k, t in times.items() if k[-1] == par) for par in (False, True)}
                floor = B * n * HKV * D * 2 * 2 / (bw * 1e9) * 1e6
                programs = B * HKV  # one row block of G = 4 query rows per (batch, kv head)
                auto = AT._want_parallel_splits(dev, programs, n, sk)
                best = min(times.values())
                rows.append({"split_keys": sk, "batch": B, "context": n, "programs_per_sm": programs / sms,
                             "loop_us": times[False], "split_us": times[True], "floor_us": floor, "auto_splits": auto,
                             "bits_equal": same, "best_fraction_of_floor": floor / best,
                             "us_by_depth_and_schedule": by_depth})
                print(f"{sk:>5} {B:>5} {n:>6} {programs / sms:>11.2f} {times[False]:>8.1f} {times[True]:>8.1f} "
                      f"{floor:>8.1f} {floor / best:>12.0%} {'split' if auto else 'loop':>5} "
                      f"{'same' if same else 'DIFFER'}  best: {min(by_depth, key=by_depth.get)}", flush=True)
                _write(args.out, dict(partial=True, bandwidth_gbps=bw, sms=sms, rows=rows))
        for L in (2048, 8192):  # the cost side: causal prefill folds its splits in-program
            q = torch.randn(1, HQ, L, D, device=dev, dtype=dt)
            k, v = (torch.randn(1, HKV, L, D, device=dev, dtype=dt) for _ in range(2))
            f = lambda: AT.triton_attention(q, k, v, None, True, enable_gqa=True, _split=sk)  # noqa: E731
            f()
            us = do_bench_cudagraph(f, rep=20) * 1e3
            prefill.append({"split_keys": sk, "tokens": L, "us": us,
                            "tflops": 2 * HQ * L * L * D / (us * 1e-6) / 1e12})  # causal: half of 4*L^2*D per head
            print(f"split {sk}: causal prefill of {L} tokens {us:.1f} us ({prefill[-1]['tflops']:.0f} TFLOP/s)")
    res = {"bandwidth_gbps": bw, "sms": sms, "kernel_split_keys": AT.SPLIT, "device": torch.cuda.get_device_name(),
           "rows": rows, "prefill": prefill}
    # Where splitting wins: the largest programs/SM ratio at which it was faster, per context.
    res["split_wins_up_to_programs_per_sm"] = {
        f"{sk}/{n}": max([r["programs_per_sm"] for r in rows
                          if r["split_keys"] == sk and r["context"] == n and r["split_us"] < r["loop_us"]], default=0.0)
        for sk in splits for n in sorted({r["context"] for r in rows})}
    print("split faster up to programs/SM:", res["split_wins_up_to_programs_per_sm"])
    if not all(r["bits_equal"] for r in rows):
        print("WARNING: the two schedules gave different bits somewhere (see bits_equal)")
    _write(args.out, res)
    return res


def _write(out_dir: str, res: dict) -> None:
    with open(os.path.join(out_dir, "decode_split_schedule.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
