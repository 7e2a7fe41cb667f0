"""``python -m benchmarks.kernels``: arguments and ``main`` (the package docstring says what it runs)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks import kernels
from benchmarks.kernels.bandwidth import measure_copy_bandwidth
from benchmarks.kernels.context import Context
from benchmarks.kernels.plots import pyplot
from benchmarks.kernels.report import environment, write_reports
from benchmarks.kernels.sections import SECTIONS, run_section
from benchmarks.kernels.shapes import FULL_GRID, QUICK_GRID
from benchmarks.kernels.timing import GraphTimer


#: ``--only bandwidth``: the bandwidth ceiling alone (it is measured in every run)
BANDWIDTH_ONLY = "bandwidth"
#: where a ``--only bandwidth`` run writes without ``--out`` (not over the committed docs report)
BANDWIDTH_OUT = "out/benchmarks_kernels_bandwidth"
FULL_OUT = "docs/benchmarks_kernels"


def parse_sections(text: str | None) -> list[str]:
    """The sections to run, in their fixed order; ``bandwidth`` alone: none (the ceiling only)."""
    if not text:
        return list(SECTIONS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == [BANDWIDTH_ONLY]:
        return []
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)} "
                                         f"(or {BANDWIDTH_ONLY} alone, for the bandwidth ceiling only)")
    return [s for s in SECTIONS if s in names]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=kernels.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=parse_sections, default=list(SECTIONS), metavar="SECTIONS",
                   help=f"comma-separated sections to run: {','.join(SECTIONS)} (default: all; the bandwidth "
                        f"ceiling is always measured), or {BANDWIDTH_ONLY} alone: the ceiling only (seconds)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and replays (under 90 s)")
    p.add_argument("--out", default=None,
                   help=f"report path without suffix: writes <out>.md, <out>.json, <out>_<section>.png "
                        f"(default {FULL_OUT}; {BANDWIDTH_OUT} with --only {BANDWIDTH_ONLY})")
    p.add_argument("--page-size", type=positive_int, default=16,
                   help="tokens per page of the paged KV cache (default 16)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = FULL_OUT if args.only else BANDWIDTH_OUT
    return args


def cuda_missing(prog: str) -> bool:
    """True (after saying why on stderr) when there is no CUDA GPU for ``prog``."""
    if torch.cuda.is_available():
        return False
    print(f"{prog} needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}). "
          "Run it on the GPU machine.", file=sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if cuda_missing("python -m benchmarks.kernels"):
        return 2
    grid = dataclasses.replace(QUICK_GRID if args.quick else FULL_GRID, page_size=args.page_size)
    timer = GraphTimer(target_s=0.005, replays=5) if args.quick else GraphTimer(target_s=0.01, replays=10)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    start = time.perf_counter()
    timer_desc = (f"median over {timer.replays} replays of a CUDA graph of ~{timer.target_s * 1e3:g} ms of calls "
                  f"(at most {timer.max_calls}); inputs rotate over copies totalling >= "
                  f"{timer.rotate_bytes / 2**20:.0f} MiB (4x L2); no L2 flush or other work between the events")
    env = environment(device, argv, "quick" if args.quick else "full", timer_desc)
    plt = pyplot()

    copy = measure_copy_bandwidth(timer, device, grid.copy_bytes)
    for m in copy["measurements"]:
        print(f"  {m['method']:<12s} {m['timer']:<6s} {m['operation']:<24s} "
              + (f"{m['gbps']:.0f} GB/s" if m["gbps"] is not None else f"failed: {m['error']}"), flush=True)
    print(f"bandwidth ceiling: {copy['gbps']:.0f} GB/s ({copy['method']}, {copy['timer']}; {env['device_name']})",
          flush=True)
    ctx = Context(device, timer, copy["gbps"])
    out, sections = Path(args.out), []
    written = write_reports(out, env, copy, grid, sections, time.perf_counter() - start, plt)
    for name in args.only:
        sections.append(run_section(name, ctx, grid))
        print("\n" + sections[-1].markdown() + "\n", flush=True)
        written = write_reports(out, env, copy, grid, sections, time.perf_counter() - start, plt)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    return 0
