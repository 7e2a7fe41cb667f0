"""When should paged decode split a row's keys over programs? (GPU; issue #13)

    python -m benchmarks.decode_split_schedule [--batches 1,2,4,8,16,32,64,128] [--contexts 512,...] [--out DIR]

Our decode kernel reduces a row's keys in fixed ``SPLIT``-key splits folded in ascending order;
whether the splits run in one program (a loop) or in parallel programs plus a merge kernel changes
the schedule only, never the bits (checked here for every cell). ``_want_parallel_splits`` splits
only when the grid has fewer programs than SMs; on the H200 the engine's decode at batch 32 and a
2048-token context (256 programs, two waves of long programs) ran at 55% of the bandwidth floor
(benchmarks/backends_speed.py, 2026-12-03). This times both schedules over batch x context
(Llama-3-8B heads: 32 q / 8 kv, head dim 128, bf16, pages of 16) against the floor (K and V bytes at
the measured copy bandwidth) and prints the programs/SM ratio where splitting starts to lose:
the evidence for the rule. Writes ``decode_split_schedule.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HQ, HKV, D, PAGE = 32, 8, 128, 16


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
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
    rows = []
    print(f"copy bandwidth {bw:.0f} GB/s, {sms} SMs, SPLIT {AT.SPLIT}")
    print(f"{'batch':>5} {'ctx':>6} {'programs/SM':>11} {'loop us':>8} {'split us':>8} {'floor us':>8} "
          f"{'best % floor':>12} {'auto':>5} bits")
    for n in map(int, args.contexts.split(",")):
        for B in map(int, args.batches.split(",")):
            pages = B * -(-n // PAGE)
            kc, vc = (torch.randn(pages, PAGE, HKV, D, device=dev, dtype=dt) for _ in range(2))
            bt = torch.randperm(pages, device=dev, dtype=torch.int32).reshape(B, -1)
            kl = torch.full((B,), n, device=dev, dtype=torch.int32)
            q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
            outs, times = {}, {}
            for split in (False, True):
                f = lambda s=split: P.triton_paged_attention(q, kc, vc, bt, kl, _parallel_splits=s)  # noqa: E731
                outs[split] = f()
                times[split] = do_bench_cudagraph(f, rep=20) * 1e3  # us
            same = torch.equal(outs[False].view(torch.int16), outs[True].view(torch.int16))
            floor = B * n * HKV * D * 2 * 2 / (bw * 1e9) * 1e6
            programs = B * HKV  # one row block of G = 4 query rows per (batch, kv head)
            auto = AT._want_parallel_splits(dev, programs, n, AT.SPLIT)
            best = min(times.values())
            rows.append({"batch": B, "context": n, "programs_per_sm": programs / sms, "loop_us": times[False],
                         "split_us": times[True], "floor_us": floor, "auto_splits": auto, "bits_equal": same,
                         "best_fraction_of_floor": floor / best})
            print(f"{B:>5} {n:>6} {programs / sms:>11.2f} {times[False]:>8.1f} {times[True]:>8.1f} {floor:>8.1f} "
                  f"{floor / best:>12.0%} {'split' if auto else 'loop':>5} {'same' if same else 'DIFFER'}")
            del kc, vc
    res = {"bandwidth_gbps": bw, "sms": sms, "split_keys": AT.SPLIT, "device": torch.cuda.get_device_name(),
           "rows": rows}
    # Where splitting wins: the largest programs/SM ratio at which it was faster, per context.
    res["split_wins_up_to_programs_per_sm"] = {
        str(n): max([r["programs_per_sm"] for r in rows if r["context"] == n and r["split_us"] < r["loop_us"]],
                    default=0.0)
        for n in sorted({r["context"] for r in rows})}
    print("split faster up to programs/SM:", res["split_wins_up_to_programs_per_sm"])
    if not all(r["bits_equal"] for r in rows):
        print("WARNING: the two schedules gave different bits somewhere (see bits_equal)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_split_schedule.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
