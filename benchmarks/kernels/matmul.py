"""Matmul section: bf16 Llama-3-8B weight shapes, ``detcompile.matmul`` against cuBLAS."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import detcompile  # noqa: F401  (registers torch.ops.detcompile.*)
from benchmarks.kernels.context import Context, free_memory
from benchmarks.kernels.measures import gbps, geomean, row0_matches, speed_ratio, tflops
from benchmarks.kernels.plots import log2_axis
from benchmarks.kernels.shapes import Grid
from benchmarks.kernels.tables import (
    bitwise_target, floor_target, fmt, fmt_bool, fmt_pct, markdown_table, target, targets_table,
)
from benchmarks.kernels.timing import Timing

if TYPE_CHECKING:  # sections imports this module
    from benchmarks.kernels.sections import Section


# Targets of issue #3 (H100, bf16).
MATMUL_GEOMEAN_TARGET = 0.95  # geomean of ours/cuBLAS over all cells
MATMUL_CELL_TARGET = 0.85  # no cell below
MATMUL_DECODE_MAX_M = 64  # M <= this is memory-bound: GB/s columns
MATMUL_DECODE_BW_TARGET = 0.85  # geomean fraction of copy bandwidth for M <= 64


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def matmul_bytes(m: int, n: int, k: int, itemsize: int = 2) -> int:
    """Bytes a matmul must move at least: read a [M, K] and b [K, N], write c [M, N]."""
    return itemsize * (m * k + k * n + m * n)


def matmul_record(shape: str, n: int, k: int, m: int, ours: Timing, cublas: Timing,
                  ours_row0: bool, cublas_row0: bool, copy_gbps: float) -> dict:
    flops = matmul_flops(m, n, k)
    rec = {
        "shape": shape, "N": n, "K": k, "M": m,
        "ours_s": ours.seconds, "cublas_s": cublas.seconds,
        "ours_tflops": tflops(flops, ours.seconds), "cublas_tflops": tflops(flops, cublas.seconds),
        "ratio": speed_ratio(ours.seconds, cublas.seconds),
        "ours_row0_bitwise": ours_row0, "cublas_row0_bitwise": cublas_row0,
        "graphed": ours.graphed and cublas.graphed,
        "bytes": None, "ours_gbps": None, "cublas_gbps": None,
        "ours_copy_fraction": None, "cublas_copy_fraction": None,
    }
    if m <= MATMUL_DECODE_MAX_M:
        nbytes = matmul_bytes(m, n, k)
        rec.update(bytes=nbytes, ours_gbps=gbps(nbytes, ours.seconds), cublas_gbps=gbps(nbytes, cublas.seconds))
        rec.update(ours_copy_fraction=rec["ours_gbps"] / copy_gbps, cublas_copy_fraction=rec["cublas_gbps"] / copy_gbps)
    return rec


def matmul_summary(cells: list[dict]) -> dict:
    if not cells:
        return {"targets": []}
    ratios = [c["ratio"] for c in cells]
    worst = min(cells, key=lambda c: c["ratio"])
    decode = [c for c in cells if c["ours_copy_fraction"] is not None]
    geo, decode_geo = geomean(ratios), geomean(c["ours_copy_fraction"] for c in decode)
    return {
        "cells": len(cells),
        "geomean_ratio": geo,
        "min_ratio": worst["ratio"],
        "min_cell": f"{worst['shape']} M={worst['M']}",
        "decode_copy_fraction_geomean": decode_geo,
        "decode_copy_fraction_min": min((c["ours_copy_fraction"] for c in decode), default=None),
        "cublas_decode_copy_fraction_geomean": geomean(c["cublas_copy_fraction"] for c in decode),
        "ours_row0_bitwise": sum(c["ours_row0_bitwise"] for c in cells),
        "cublas_row0_bitwise": sum(c["cublas_row0_bitwise"] for c in cells),
        "targets": [
            target(f"geomean ours/cuBLAS >= {MATMUL_GEOMEAN_TARGET}", f"{geo:.3f}", geo >= MATMUL_GEOMEAN_TARGET),
            floor_target(f"no cell below {MATMUL_CELL_TARGET}x", worst, "ratio", MATMUL_CELL_TARGET,
                         lambda c: f"min {c['ratio']:.3f} ({c['shape']} M={c['M']})"),
            target(f"M <= {MATMUL_DECODE_MAX_M}: geomean >= {MATMUL_DECODE_BW_TARGET:.0%} of copy bandwidth",
                   fmt_pct(decode_geo), None if decode_geo is None else decode_geo >= MATMUL_DECODE_BW_TARGET),
            bitwise_target("ours: row 0 bitwise equal to M=1 in every cell", cells, "ours_row0_bitwise"),
        ],
    }


def matmul_markdown(tables: dict, summary: dict) -> str:
    headers = ["shape (N, K)", "M", "cuBLAS TFLOP/s", "ours TFLOP/s", "ours/cuBLAS", "ours row0 = M=1",
               "cuBLAS row0 = M=1", "cuBLAS GB/s", "ours GB/s", "cuBLAS % copy", "ours % copy"]
    rows = [[f"{c['shape']} ({c['N']}, {c['K']})" + ("" if c["graphed"] else " †"), c["M"],
             fmt(c["cublas_tflops"], ".1f"), fmt(c["ours_tflops"], ".1f"), fmt(c["ratio"], ".3f"),
             fmt_bool(c["ours_row0_bitwise"]), fmt_bool(c["cublas_row0_bitwise"]),
             fmt(c["cublas_gbps"], ".0f"), fmt(c["ours_gbps"], ".0f"),
             fmt_pct(c["cublas_copy_fraction"]), fmt_pct(c["ours_copy_fraction"])]
            for c in tables.get("cells", [])]
    parts = [markdown_table(headers, rows)]
    if summary.get("cells"):
        parts.append(
            f"{summary['cells']} cells. Geomean ours/cuBLAS {summary['geomean_ratio']:.3f}, min "
            f"{summary['min_ratio']:.3f} ({summary['min_cell']}). M <= {MATMUL_DECODE_MAX_M}: geomean "
            f"{fmt_pct(summary['decode_copy_fraction_geomean'])} of copy bandwidth (cuBLAS "
            f"{fmt_pct(summary['cublas_decode_copy_fraction_geomean'])}). Row 0 bitwise equal to M=1: ours "
            f"{summary['ours_row0_bitwise']}/{summary['cells']}, "
            f"cuBLAS {summary['cublas_row0_bitwise']}/{summary['cells']}."
        )
        parts.append(targets_table(summary["targets"]))
    return "\n\n".join(parts)


def run_matmul(ctx: Context, grid: Grid, section: Section) -> None:
    cells = section.tables.setdefault("cells", [])
    mm = torch.ops.detcompile.matmul
    with ctx.progress(len(grid.matmul_shapes) * len(grid.matmul_ms), "matmul") as bar:
        for shape, (n, k) in grid.matmul_shapes.items():
            a_all = ctx.randn(max(grid.matmul_ms), k)  # every M uses a prefix of the same rows
            b = ctx.randn(n, k).t()  # nn.Linear weight [N, K], passed transposed as the FX pass does
            ours_alone, cublas_alone = mm(a_all[:1], b), torch.mm(a_all[:1], b)
            for m in grid.matmul_ms:
                bar.set_postfix_str(f"{shape} M={m}")
                a = a_all[:m]
                ours_row0 = row0_matches(mm(a, b), ours_alone)
                cublas_row0 = row0_matches(torch.mm(a, b), cublas_alone)
                cublas_t = ctx.timer(torch.mm, a, b)
                ours_t = ctx.timer(mm, a, b)
                cells.append(matmul_record(shape, n, k, m, ours_t, cublas_t, ours_row0, cublas_row0, ctx.copy_gbps))
                bar.update()
            del a_all, b, ours_alone, cublas_alone
            free_memory(ctx.device)


def plot_matmul(plt, tables: dict, title: str):
    cells = tables.get("cells", [])
    fig, (ax_ratio, ax_bw) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, shape in enumerate(dict.fromkeys(c["shape"] for c in cells)):
        rows, color = [c for c in cells if c["shape"] == shape], f"C{i}"
        ax_ratio.plot([c["M"] for c in rows], [c["ratio"] for c in rows], "o-", color=color, label=shape)
        dec = [c for c in rows if c["ours_copy_fraction"] is not None]
        ax_bw.plot([c["M"] for c in dec], [100 * c["ours_copy_fraction"] for c in dec], "o-", color=color,
                   label=f"{shape} ours")
        ax_bw.plot([c["M"] for c in dec], [100 * c["cublas_copy_fraction"] for c in dec], "x--", color=color,
                   alpha=0.6, label=f"{shape} cuBLAS")
    ax_ratio.axhline(MATMUL_GEOMEAN_TARGET, color="gray", ls="--", label=f"{MATMUL_GEOMEAN_TARGET} (geomean target)")
    ax_ratio.axhline(MATMUL_CELL_TARGET, color="red", ls=":", label=f"{MATMUL_CELL_TARGET} (per-cell target)")
    ax_ratio.set_ylabel("ours / cuBLAS (speed)")
    log2_axis(ax_ratio, sorted({c["M"] for c in cells}), "M (rows)")
    ax_bw.axhline(100 * MATMUL_DECODE_BW_TARGET, color="red", ls=":", label="target")
    ax_bw.set_ylabel("% of copy bandwidth")
    log2_axis(ax_bw, sorted({c["M"] for c in cells if c["M"] <= MATMUL_DECODE_MAX_M}) or [1], "M (rows)")
    ax_ratio.legend(fontsize=7)
    ax_bw.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    return fig
