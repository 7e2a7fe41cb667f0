"""Norms section: ``rms_norm`` / ``softmax`` / ``log_softmax`` against the stock torch ops."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

import detcompile  # noqa: F401  (registers torch.ops.detcompile.*)
from benchmarks.kernels.context import Context, free_memory
from benchmarks.kernels.measures import gbps, geomean, row0_matches, speed_ratio
from benchmarks.kernels.plots import log2_axis
from benchmarks.kernels.shapes import Grid
from benchmarks.kernels.tables import (
    bitwise_target, floor_target, fmt, fmt_bool, fmt_pct, fmt_time, markdown_table, targets_table,
)
from benchmarks.kernels.timing import Timing

if TYPE_CHECKING:  # sections imports this module
    from benchmarks.kernels.sections import Section


RMS_EPS = 1e-5
# Targets of issue #3 (H100, bf16).
NORM_BW_TARGET = 0.85  # fraction of copy bandwidth, every cell with T >= NORM_TARGET_MIN_TOKENS
NORM_TARGET_MIN_TOKENS = 1024  # fewer rows cannot fill the GPU; those cells are informative


def norm_bytes(op: str, tokens: int, width: int, itemsize: int = 2) -> int:
    """Bytes read + written by a row-wise op: x in, out (same dtype) out, and RMSNorm's weight."""
    return itemsize * (2 * tokens * width + (width if op == "rms_norm" else 0))


def norm_record(op: str, tokens: int, width: int, ours: Timing, stock: Timing, row0: bool,
                copy_gbps: float) -> dict:
    nbytes = norm_bytes(op, tokens, width)
    ours_gbps, stock_gbps = gbps(nbytes, ours.seconds), gbps(nbytes, stock.seconds)
    return {
        "op": op, "tokens": tokens, "width": width, "bytes": nbytes,
        "ours_s": ours.seconds, "torch_s": stock.seconds, "ours_gbps": ours_gbps, "torch_gbps": stock_gbps,
        "ours_copy_fraction": ours_gbps / copy_gbps, "torch_copy_fraction": stock_gbps / copy_gbps,
        "ratio": speed_ratio(ours.seconds, stock.seconds), "row0_bitwise": row0,
        "graphed": ours.graphed and stock.graphed,
    }


def norms_summary(cells: list[dict]) -> dict:
    judged = [c for c in cells if c["tokens"] >= NORM_TARGET_MIN_TOKENS]
    worst = min(judged, key=lambda c: c["ours_copy_fraction"], default=None)
    return {
        "judged_cells": len(judged),
        "copy_fraction_geomean": geomean(c["ours_copy_fraction"] for c in judged),
        "copy_fraction_min": None if worst is None else worst["ours_copy_fraction"],
        "min_cell": None if worst is None else f"{worst['op']} [{worst['tokens']}, {worst['width']}]",
        "targets": [
            floor_target(f"T >= {NORM_TARGET_MIN_TOKENS}: every cell >= {NORM_BW_TARGET:.0%} of copy bandwidth",
                         worst, "ours_copy_fraction", NORM_BW_TARGET,
                         lambda c: f"min {fmt_pct(c['ours_copy_fraction'])} ({c['op']} [{c['tokens']}, {c['width']}])"),
            bitwise_target("row 0 bitwise equal to T=1 in every cell", cells),
        ],
    }


def norms_markdown(tables: dict, summary: dict) -> str:
    headers = ["op", "shape", "torch", "ours", "torch GB/s", "ours GB/s", "torch % copy", "ours % copy",
               "ours/torch", "row0 = T=1"]
    rows = [[c["op"] + ("" if c["graphed"] else " †"), f"[{c['tokens']}, {c['width']}]", fmt_time(c["torch_s"]),
             fmt_time(c["ours_s"]), fmt(c["torch_gbps"], ".0f"), fmt(c["ours_gbps"], ".0f"),
             fmt_pct(c["torch_copy_fraction"]), fmt_pct(c["ours_copy_fraction"]), fmt(c["ratio"], ".2f"),
             fmt_bool(c["row0_bitwise"])]
            for c in tables.get("cells", [])]
    parts = [markdown_table(headers, rows),
             f"GB/s = (bytes read + bytes written once) / time. The target applies to T >= "
             f"{NORM_TARGET_MIN_TOKENS}: fewer rows (one program per row) cannot fill the GPU."]
    if summary.get("judged_cells"):
        parts.append(targets_table(summary["targets"]))
    return "\n\n".join(parts)


def norm_ops() -> dict[str, tuple[Callable, Callable]]:
    """name -> (ours(x, w), stock(x, w)); softmax ignores w (passed as None)."""
    det = torch.ops.detcompile
    return {
        "rms_norm": (lambda x, w: det.rms_norm(x, w, RMS_EPS), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, RMS_EPS)),
        "softmax": (lambda x, w: det.softmax(x, -1, False, False), lambda x, w: torch.softmax(x, -1)),
        "log_softmax": (lambda x, w: det.softmax(x, -1, False, True), lambda x, w: torch.log_softmax(x, -1)),
    }


def run_norms(ctx: Context, grid: Grid, section: Section) -> None:
    cells = section.tables.setdefault("cells", [])
    ops = norm_ops()
    with ctx.progress(len(grid.norm_widths) * len(ops) * len(grid.norm_tokens), "norms") as bar:
        for width in grid.norm_widths:
            x_all = ctx.randn(max(grid.norm_tokens), width)
            weight = ctx.randn(width)
            for op, (ours, stock) in ops.items():
                w = weight if op == "rms_norm" else None
                alone = ours(x_all[:1], w)
                for tokens in grid.norm_tokens:
                    bar.set_postfix_str(f"{op} [{tokens}, {width}]")
                    x = x_all[:tokens]
                    row0 = row0_matches(ours(x, w), alone)
                    stock_t, ours_t = ctx.timer(stock, x, w), ctx.timer(ours, x, w)
                    cells.append(norm_record(op, tokens, width, ours_t, stock_t, row0, ctx.copy_gbps))
                    bar.update()
            del x_all, weight
            free_memory(ctx.device)


def plot_norms(plt, tables: dict, title: str):
    cells = tables.get("cells", [])
    widths = list(dict.fromkeys(c["width"] for c in cells)) or [0]
    fig, axes = plt.subplots(1, len(widths), figsize=(6.5 * len(widths), 4.5), squeeze=False)
    for ax, width in zip(axes[0], widths):
        rows = [c for c in cells if c["width"] == width]
        for i, op in enumerate(dict.fromkeys(c["op"] for c in rows)):
            mine = [c for c in rows if c["op"] == op]
            ax.plot([c["tokens"] for c in mine], [100 * c["ours_copy_fraction"] for c in mine], "o-", color=f"C{i}",
                    label=f"{op} ours")
            ax.plot([c["tokens"] for c in mine], [100 * c["torch_copy_fraction"] for c in mine], "x--",
                    color=f"C{i}", alpha=0.6, label=f"{op} torch")
        ax.axhline(100 * NORM_BW_TARGET, color="red", ls=":", label=f"target (T >= {NORM_TARGET_MIN_TOKENS})")
        ax.set_title(f"[T, {width}]", fontsize=9)
        ax.set_ylabel("% of copy bandwidth")
        log2_axis(ax, sorted({c["tokens"] for c in rows}) or [1], "T (rows)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig
