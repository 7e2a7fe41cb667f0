"""Split-row schedules of the row kernels (rms_norm, softmax, log_softmax, layer_norm) on the GPU.

    python -m benchmarks.norm_schedules [--out DIR] [--ops rms_norm,softmax,...] [--warps 4,8,16] [--quick]

For bf16 ``[T, 128256]`` (T in 64, 1024, 8192) and ``[T, 4096]`` (T in 1024, 8192), times every
schedule of split rows (``detcompile.kernels.row_kernels.choose_schedule``): ``two_launch`` (the default),
``sync`` (one launch of cooperating programs) and ``row_loop`` (one program per row) with each warp
count of ``--warps``. The schedule is switched in-process with ``row_kernels.row_schedule`` (it is read
when a kernel is launched, so also when the timer captures its CUDA graph). Every schedule's output
must have the bits of ``two_launch``'s (``same_bits``); a mismatch is printed and makes the exit
status 1. A ``[T, 4096]`` row is not split (one program per row): no schedule applies, it is timed
once, as a reference point.

Timing and bytes as in ``benchmarks.kernels``: ``GraphTimer`` (median over replays of a CUDA graph
of many calls, inputs rotating over >= 4x L2), ``norm_bytes`` (x read + out written, plus
rms_norm's weight; layer_norm adds its weight, bias and fp32 mean/rstd), and the fraction of copy
bandwidth (``measure_copy_bandwidth``: the best of a memcpy, an SM copy kernel and a read of 1 GiB bf16).

Output: a markdown table on stdout and ``DIR/norm_schedules.json``. Needs one CUDA GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.kernels.bandwidth import measure_copy_bandwidth
from benchmarks.kernels.cli import cuda_missing
from benchmarks.kernels.measures import DTYPE, gbps, same_bits
from benchmarks.kernels.norms import norm_bytes
from benchmarks.kernels.report import triton_version
from benchmarks.kernels.tables import fmt_pct, fmt_time, markdown_table
from benchmarks.kernels.timing import GraphTimer, Timing

#: (width, tokens) cells: the LM-head width (split rows) and a hidden size (one program per row).
CELLS = ((128256, (64, 1024, 8192)), (4096, (1024, 8192)))
OPS = ("rms_norm", "softmax", "log_softmax", "layer_norm")
WARPS = (4, 8, 16)
RMS_EPS = 1e-5
LN_EPS = 1e-5
COPY_BYTES = 1 << 30


def op_functions() -> dict[str, Callable]:
    """name -> fn(x, w, b); softmax ignores w and b, rms_norm ignores b."""
    det = torch.ops.detcompile
    return {
        "rms_norm": lambda x, w, b: det.rms_norm(x, w, RMS_EPS),
        "softmax": lambda x, w, b: det.softmax(x, -1, False, False),
        "log_softmax": lambda x, w, b: det.softmax(x, -1, False, True),
        "layer_norm": lambda x, w, b: det.layer_norm(x, [x.shape[-1]], w, b, LN_EPS),
    }


def op_bytes(op: str, tokens: int, width: int) -> int:
    """Bytes an op must move at least (``benchmarks.kernels.norm_bytes``; layer_norm also reads
    its bf16 weight and bias and writes fp32 mean and rstd per row)."""
    if op == "layer_norm":
        return norm_bytes(op, tokens, width) + 2 * 2 * width + 2 * 4 * tokens
    return norm_bytes(op, tokens, width)


def variants(warps: Sequence[int]) -> list[tuple[str, str, int | None]]:
    """(label, schedule, row_loop warps); the first is the bitwise reference."""
    return [("two_launch", "two_launch", None), ("sync", "sync", None)] + [
        (f"row_loop/{w}w", "row_loop", w) for w in warps
    ]


def outputs_equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    return same_bits(a, b)


def run_cells(timer: Callable[..., Timing], device: torch.device, copy_gbps: float, ops: Sequence[str],
              warps: Sequence[int], cells=CELLS, log=print) -> list[dict]:
    """Time every (op, shape, schedule) with ``timer(fn, *args) -> Timing``; one record per timing.
    (The timer and the device are parameters so that the loop can be tried on the CPU, in the
    Triton interpreter, with a stand-in timer.)"""
    from detcompile.kernels import row_kernels as rk

    fns = op_functions()
    records = []
    for width, token_counts in cells:
        plan = rk.row_plan(width)
        x_all = torch.randn(max(token_counts), width, dtype=DTYPE, device=device)
        w = torch.randn(width, dtype=DTYPE, device=device)
        b = torch.randn(width, dtype=DTYPE, device=device)
        for op in ops:
            fn = fns[op]
            for tokens in token_counts:
                x = x_all[:tokens]
                nbytes = op_bytes(op, tokens, width)
                todo = variants(warps) if plan.split else [("one program per row", None, None)]
                ref = None
                for label, schedule, nw in todo:
                    with rk.row_schedule(schedule, row_loop_warps=nw):
                        effective = rk.choose_schedule(tokens, plan.segments) if plan.split else "register"
                        t = timer(fn, x, w, b)
                        out = fn(x, w, b)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if ref is None:
                        ref, same = out, True
                    else:
                        same = outputs_equal(out, ref)
                    del out
                    rate = gbps(nbytes, t.seconds)
                    rec = {
                        "op": op, "tokens": tokens, "width": width, "segments": plan.segments,
                        "variant": label, "schedule": schedule, "effective_schedule": effective,
                        "row_loop_warps": nw, "bytes": nbytes, "seconds": t.seconds, "gbps": rate,
                        "copy_fraction": rate / copy_gbps, "same_bits_as_two_launch": same,
                        "graphed": t.graphed,
                    }
                    records.append(rec)
                    log(f"{op:12s} [{tokens}, {width}] {label:20s} {fmt_time(t.seconds):>9s} "
                        f"{fmt_pct(rec['copy_fraction']):>6s} of copy"
                        + ("" if same else "   BITS DIFFER FROM two_launch")
                        + ("" if effective in (schedule, "register") else f"   (ran {effective})"))
                del ref
        del x_all, w, b
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def table(records: list[dict], warps: Sequence[int]) -> str:
    labels = [label for label, _, _ in variants(warps)]
    headers = ["op", "shape"] + labels + ["best", "same bits"]
    rows = []
    keys = list(dict.fromkeys((r["op"], r["tokens"], r["width"]) for r in records))
    for key in keys:
        recs = [r for r in records if (r["op"], r["tokens"], r["width"]) == key]
        by = {r["variant"]: r for r in recs}
        best = max(recs, key=lambda r: r["copy_fraction"])
        if len(recs) == 1:  # not split: one program per row
            cols = [f"{fmt_pct(best['copy_fraction'])} ({fmt_time(best['seconds'])})"] + ["–"] * (len(labels) - 1)
            best_label = "one program per row"
        else:
            cols = [(f"{fmt_pct(by[lb]['copy_fraction'])} ({fmt_time(by[lb]['seconds'])})"
                     + ("" if by[lb]["graphed"] else " †")
                     + ("" if by[lb]["effective_schedule"] == by[lb]["schedule"] else " ‡"))
                    if lb in by else "–" for lb in labels]
            best_label = best["variant"]
        same = all(r["same_bits_as_two_launch"] for r in recs)
        rows.append([key[0], f"[{key[1]}, {key[2]}]"] + cols + [best_label, "yes" if same else "**NO**"])
    return "\n\n".join([
        markdown_table(headers, rows),
        "Each cell: fraction of copy bandwidth (time of one call). † timed eagerly (graph capture failed). "
        "‡ the schedule could not run and fell back to two_launch. [T, 4096] rows are not split: one "
        "program per row, no schedule.",
    ])


def environment(device: torch.device, argv: Sequence[str], timer: GraphTimer) -> dict:
    from benchmarks.model_sweep import git_commit
    from detcompile.kernels import row_kernels as rk

    props = torch.cuda.get_device_properties(device)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device_name": torch.cuda.get_device_name(device), "sm_count": props.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
        "python": platform.python_version(), "commit": git_commit() or "unknown",
        "command": " ".join(["python -m benchmarks.norm_schedules", *argv]),
        "timing": f"median over {timer.replays} replays of a CUDA graph of ~{timer.target_s * 1e3:g} ms of calls; "
                  f"inputs rotate over >= {timer.rotate_bytes / 2**20:.0f} MiB",
        "row_constants": {k: getattr(rk, k) for k in (
            "ROW_LANES", "ROW_SEG_CHUNKS", "ROW_NUM_WARPS", "ROW_LOOP_NUM_WARPS", "ROW_MAX_SYNC_SEGMENTS",
            "ROW_SPLIT_MAXNREG")},
        "has_atomic_poll": rk.HAS_ATOMIC_POLL,
    }


def _csv(kind: Callable, choices: Sequence | None = None):
    def parse(text: str):
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        bad = [i for i in items if choices is not None and i not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"bad value(s) {bad or text!r}" + (f"; choose from {', '.join(map(str, choices))}" if choices else ""))
        return items
    return parse


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.norm_schedules", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/norm_schedules", help="directory of norm_schedules.json (default %(default)s)")
    p.add_argument("--ops", type=_csv(str, OPS), default=list(OPS), help=f"comma-separated ops (default {','.join(OPS)})")
    p.add_argument("--warps", type=_csv(int, (1, 2, 4, 8, 16, 32)), default=list(WARPS),
                   help="warp counts of row_loop (default 4,8,16)")
    p.add_argument("--quick", action="store_true", help="fewer replays, shorter graphs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if cuda_missing("python -m benchmarks.norm_schedules"):
        return 2
    timer = GraphTimer(target_s=0.005, replays=5) if args.quick else GraphTimer(target_s=0.01, replays=10)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    start = time.perf_counter()
    env = environment(device, argv, timer)
    copy = measure_copy_bandwidth(timer, device, COPY_BYTES)
    print(f"copy bandwidth: {copy['gbps']:.0f} GB/s ({env['device_name']})", flush=True)
    records = run_cells(timer, device, copy["gbps"], args.ops, args.warps,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    md = table(records, args.warps)
    print("\n" + md + "\n")
    mismatches = [r for r in records if not r["same_bits_as_two_launch"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "norm_schedules.json"
    path.write_text(json.dumps({"environment": env, "copy_bandwidth": copy, "records": records,
                                "mismatches": len(mismatches), "wall_s": round(time.perf_counter() - start, 1)},
                               indent=1) + "\n")
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    if mismatches:
        print(f"{len(mismatches)} schedule(s) gave other bits than two_launch: "
              + ", ".join(f"{r['op']} [{r['tokens']}, {r['width']}] {r['variant']}" for r in mismatches),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
