"""Kernel speed (issue #3): detcompile's batch-invariant kernels against cuBLAS, torch and SDPA.

    python -m benchmarks.kernels [--only matmul,norms,attention] [--quick] [--out docs/benchmarks_kernels]
                                 [--page-size 16]

Needs one CUDA GPU (written for an H100; sized to finish well under 4 minutes including Triton
compiles, ``--quick`` under 90 s; not yet run on a GPU when written). Sections:

* copy bandwidth, always: ``dst.copy_(src)`` on 1 GiB of bf16, read + write bytes. Every GB/s figure
  below is compared with it.
* ``matmul``: bf16 Llama-3-8B weight shapes, ``detcompile.matmul(a, w.t())`` against ``torch.mm``
  (cuBLAS); TFLOP/s, ratio, the bitwise check of row 0 against M=1, GB/s for decode-sized M.
* ``norms``: ``detcompile.rms_norm`` / ``softmax`` / ``log_softmax`` over [T, 4096] and [T, 128256]
  against the stock torch ops; GB/s against copy bandwidth.
* ``attention``: 32 query / 8 KV heads, head dim 128: causal prefill against SDPA (flash), and decode
  from a paged cache (``detcompile.kernels.paged_attention.paged_attention``, skipped while it does not
  exist) against the bandwidth floor (KV bytes / copy bandwidth).

Timing: each number is the median, over replays, of one call inside a CUDA graph that holds many calls
(:class:`GraphTimer`), so Python and launch overhead are left out for detcompile and the baselines
alike. Every function runs eagerly first (which compiles its Triton kernels), outside the graph. The
inputs rotate over enough copies that a graph's working set is at least 4x the L2 cache: a weight or
activation that fits in L2 would otherwise be read from L2 on every call after the first, and
memory-bound kernels would look faster than copy bandwidth.

Output: markdown tables on stdout (progress bars on stderr); ``<out>.md`` (the tables, with date,
device and versions), ``<out>.json`` (raw numbers) and ``<out>_{matmul,norms,attention}.png``
(matplotlib, the ``bench`` extra; skipped with a warning if it is missing). The reports are rewritten
after each section, so an interrupted run keeps what it measured.

The pure helpers (formatting, ratios, targets, bitwise checks, paged-cache layout) are tested on the
CPU in ``tests/benchmarks``; the timings need the GPU.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import importlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

import detcompile  # noqa: F401  (registers torch.ops.detcompile.*)

SECTIONS = ("matmul", "norms", "attention")
DTYPE = torch.bfloat16
GB = 1e9

#: Llama-3-8B weights as nn.Linear stores them: (N, K) = (out_features, in_features).
MATMUL_SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
RMS_EPS = 1e-5

# Targets of issue #3 (H100, bf16).
MATMUL_GEOMEAN_TARGET = 0.95  # geomean of ours/cuBLAS over all cells
MATMUL_CELL_TARGET = 0.85  # no cell below
MATMUL_DECODE_MAX_M = 64  # M <= this is memory-bound: GB/s columns
MATMUL_DECODE_BW_TARGET = 0.85  # geomean fraction of copy bandwidth for M <= 64
NORM_BW_TARGET = 0.85  # fraction of copy bandwidth, every cell with T >= NORM_TARGET_MIN_TOKENS
NORM_TARGET_MIN_TOKENS = 1024  # fewer rows cannot fill the GPU; those cells are informative
PREFILL_TARGET = 0.8  # ours/flash, every cell
DECODE_FLOOR_TARGET = 0.8  # fraction of the bandwidth floor, every cell with batch >= DECODE_TARGET_MIN_BATCH
DECODE_TARGET_MIN_BATCH = 32


# ------------------------------------------------------------------------------------------------
# What is measured.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """The shapes of one run (the tests use a tiny one on the CPU)."""

    matmul_shapes: dict = dataclasses.field(default_factory=lambda: dict(MATMUL_SHAPES))
    matmul_ms: tuple = (1, 16, 64, 256, 1024, 4096, 8192)
    norm_widths: tuple = (4096, 128256)
    norm_tokens: tuple = (1, 64, 1024, 8192)
    prefill_cases: tuple = ((1, 1024), (4, 1024), (1, 4096), (1, 8192))  # (batch, tokens)
    decode_kv_lens: tuple = (1024, 4096, 16384, 32768)
    decode_batches: tuple = (1, 8, 32, 64, 128, 256)
    decode_max_cache_bytes: int = 40 * 10**9  # K + V; larger cells are skipped
    sdpa_decode_max_batch: int = 64  # the contiguous SDPA reference needs a second copy of the cache
    page_size: int = 16
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    copy_bytes: int = 1 << 30


FULL_GRID = Grid()
QUICK_GRID = dataclasses.replace(
    FULL_GRID,
    matmul_ms=(1, 64, 1024, 8192),
    norm_tokens=(1, 1024, 8192),
    prefill_cases=((1, 1024), (4, 1024), (1, 8192)),
    decode_kv_lens=(1024, 32768),
    decode_batches=(1, 32, 256),
)


# ------------------------------------------------------------------------------------------------
# Pure helpers: arithmetic, bitwise checks, formatting (tested on the CPU).
# ------------------------------------------------------------------------------------------------


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if any(v <= 0 for v in vals):
        raise ValueError(f"geomean needs positive values, got {vals}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def speed_ratio(ours_s: float, baseline_s: float) -> float:
    """Our speed relative to the baseline's (> 1: ours is faster), from the two times."""
    return baseline_s / ours_s


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / GB


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def matmul_bytes(m: int, n: int, k: int, itemsize: int = 2) -> int:
    """Bytes a matmul must move at least: read a [M, K] and b [K, N], write c [M, N]."""
    return itemsize * (m * k + k * n + m * n)


def norm_bytes(op: str, tokens: int, width: int, itemsize: int = 2) -> int:
    """Bytes read + written by a row-wise op: x in, out (same dtype) out, and RMSNorm's weight."""
    return itemsize * (2 * tokens * width + (width if op == "rms_norm" else 0))


def causal_attention_flops(batch: int, heads_q: int, length: int, head_dim: int) -> float:
    """FLOPs of causal attention (QK^T and PV, 2 flops per multiply-add, half the square visible)."""
    return 4 * batch * heads_q * length * length * head_dim / 2


def kv_cache_bytes(batch: int, kv_len: int, heads_kv: int, head_dim: int, itemsize: int = 2) -> int:
    """Bytes of the keys and values one decode step must read."""
    return 2 * batch * kv_len * heads_kv * head_dim * itemsize


_INT_OF_ITEMSIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: the claim detcompile makes. Unlike torch.equal, -0.0 and 0.0 differ and two
    NaNs with the same bits are equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = _INT_OF_ITEMSIZE[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def row0_matches(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Whether row 0 (index 0 of dim 0) of a batched result has the bits of that row computed alone
    (``alone`` keeps its leading dim of size 1)."""
    return same_bits(batched[:1], alone)


def rotation_count(bytes_per_call: int, rotate_bytes: int, max_copies: int) -> int:
    """How many copies of a call's inputs make a working set of at least ``rotate_bytes``."""
    if bytes_per_call <= 0:
        return max_copies
    return max(1, min(max_copies, math.ceil(rotate_bytes / bytes_per_call)))


def calls_per_graph(est_s: float, target_s: float, copies: int, max_calls: int) -> int:
    """Calls in one graph: about ``target_s`` of work, at least one per input copy, whole rotations."""
    calls = round(target_s / max(est_s, 1e-9))
    calls = max(copies, min(calls, max_calls))
    return math.ceil(calls / copies) * copies


def make_block_table(batch: int, pages_per_seq: int, device="cpu") -> torch.Tensor:
    """int32 [batch, pages_per_seq]: a random permutation of all pages, so neighbouring tokens of a
    sequence sit in unrelated pages, as in a real paged cache."""
    perm = torch.randperm(batch * pages_per_seq, device=device)
    return perm.view(batch, pages_per_seq).to(torch.int32)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Contiguous [B, H, kv_len, D] from a paged cache [pages, page_size, H, D]: token t of sequence b
    is at ``cache[block_table[b, t // page_size], t % page_size]``."""
    pages = cache[block_table.long()]  # [B, pages_per_seq, page_size, H, D]
    b, n, page, h, d = pages.shape
    return pages.reshape(b, n * page, h, d)[:, :kv_len].transpose(1, 2).contiguous()


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def fmt_pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.0f}%"


def fmt_bool(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def fmt_bytes(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table padded to column widths, so it also reads well on a terminal."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
    widths = [max([3, len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(items):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(items, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def target(description: str, measured: str, ok: bool | None) -> dict:
    """One target line: ``ok`` None means nothing was measured that it applies to."""
    return {"target": description, "measured": measured, "pass": ok}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets_table(targets: list[dict]) -> str:
    return markdown_table(["target", "measured", "result"],
                          [[t["target"], t["measured"], verdict(t["pass"])] for t in targets])


# ------------------------------------------------------------------------------------------------
# Records, summaries and tables, one set per section (pure: they only read numbers).
# ------------------------------------------------------------------------------------------------


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
            target(f"no cell below {MATMUL_CELL_TARGET}x",
                   f"min {worst['ratio']:.3f} ({worst['shape']} M={worst['M']})",
                   worst["ratio"] >= MATMUL_CELL_TARGET),
            target(f"M <= {MATMUL_DECODE_MAX_M}: geomean >= {MATMUL_DECODE_BW_TARGET:.0%} of copy bandwidth",
                   fmt_pct(decode_geo), None if decode_geo is None else decode_geo >= MATMUL_DECODE_BW_TARGET),
            target("ours: row 0 bitwise equal to M=1 in every cell",
                   f"{sum(c['ours_row0_bitwise'] for c in cells)}/{len(cells)}",
                   all(c["ours_row0_bitwise"] for c in cells)),
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
            target(f"T >= {NORM_TARGET_MIN_TOKENS}: every cell >= {NORM_BW_TARGET:.0%} of copy bandwidth",
                   "–" if worst is None else f"min {fmt_pct(worst['ours_copy_fraction'])} ({worst['op']} "
                                             f"[{worst['tokens']}, {worst['width']}])",
                   None if worst is None else worst["ours_copy_fraction"] >= NORM_BW_TARGET),
            target("row 0 bitwise equal to T=1 in every cell", f"{sum(c['row0_bitwise'] for c in cells)}/{len(cells)}",
                   all(c["row0_bitwise"] for c in cells) if cells else None),
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


def prefill_record(batch: int, length: int, heads_q: int, head_dim: int, ours: Timing, flash: Timing | None,
                   row0: bool | None, flash_variant: str | None) -> dict:
    flops = causal_attention_flops(batch, heads_q, length, head_dim)
    return {
        "batch": batch, "tokens": length, "ours_s": ours.seconds, "ours_tflops": tflops(flops, ours.seconds),
        "flash_s": None if flash is None else flash.seconds,
        "flash_tflops": None if flash is None else tflops(flops, flash.seconds),
        "ratio": None if flash is None else speed_ratio(ours.seconds, flash.seconds),
        "flash_variant": flash_variant, "row0_bitwise": row0,
        "graphed": ours.graphed and (flash is None or flash.graphed),
    }


def prefill_summary(cells: list[dict]) -> dict:
    compared = [c for c in cells if c["ratio"] is not None]
    worst = min(compared, key=lambda c: c["ratio"], default=None)
    checked = [c for c in cells if c["row0_bitwise"] is not None]
    return {
        "ratio_geomean": geomean(c["ratio"] for c in compared),
        "ratio_min": None if worst is None else worst["ratio"],
        "targets": [
            target(f"every cell >= {PREFILL_TARGET}x SDPA flash",
                   "–" if worst is None else f"min {worst['ratio']:.3f} (B={worst['batch']}, L={worst['tokens']})",
                   None if worst is None else worst["ratio"] >= PREFILL_TARGET),
            target("batch row 0 bitwise equal to batch 1", f"{sum(c['row0_bitwise'] for c in checked)}/{len(checked)}",
                   all(c["row0_bitwise"] for c in checked) if checked else None),
        ],
    }


def decode_record(kv_len: int, batch: int, kv_bytes: int, ours: Timing, sdpa: Timing | None,
                  sdpa_variant: str | None, row0: bool | None, equals_prefill: bool | None,
                  copy_gbps: float) -> dict:
    ours_gbps = gbps(kv_bytes, ours.seconds)
    return {
        "kv_len": kv_len, "batch": batch, "kv_bytes": kv_bytes, "skipped": "",
        "ours_s": ours.seconds, "ours_gbps": ours_gbps,
        "floor_s": kv_bytes / (copy_gbps * GB), "floor_fraction": ours_gbps / copy_gbps,
        "sdpa_s": None if sdpa is None else sdpa.seconds,
        "sdpa_gbps": None if sdpa is None else gbps(kv_bytes, sdpa.seconds),
        "ratio_vs_sdpa": None if sdpa is None else speed_ratio(ours.seconds, sdpa.seconds),
        "sdpa_variant": sdpa_variant, "row0_bitwise": row0, "equals_prefill": equals_prefill,
        "graphed": ours.graphed and (sdpa is None or sdpa.graphed),
    }


def skipped_decode_record(kv_len: int, batch: int, kv_bytes: int, why: str) -> dict:
    return {"kv_len": kv_len, "batch": batch, "kv_bytes": kv_bytes, "skipped": why}


def decode_summary(cells: list[dict]) -> dict:
    judged = [c for c in cells if not c["skipped"] and c["batch"] >= DECODE_TARGET_MIN_BATCH]
    worst = min(judged, key=lambda c: c["floor_fraction"], default=None)
    measured = [c for c in cells if not c["skipped"]]
    checked = [c for c in measured if c["row0_bitwise"] is not None]
    return {
        "judged_cells": len(judged),
        "floor_fraction_geomean": geomean(c["floor_fraction"] for c in judged),
        "floor_fraction_min": None if worst is None else worst["floor_fraction"],
        "targets": [
            target(f"batch >= {DECODE_TARGET_MIN_BATCH}: every cell >= {DECODE_FLOOR_TARGET:.0%} of the "
                   "bandwidth floor",
                   "–" if worst is None else f"min {fmt_pct(worst['floor_fraction'])} (KV {worst['kv_len']}, "
                                             f"batch {worst['batch']})",
                   None if worst is None else worst["floor_fraction"] >= DECODE_FLOOR_TARGET),
            target("batch row 0 bitwise equal to batch 1", f"{sum(c['row0_bitwise'] for c in checked)}/{len(checked)}",
                   all(c["row0_bitwise"] for c in checked) if checked else None),
        ],
    }


def attention_markdown(tables: dict, summary: dict) -> str:
    parts = ["### Causal prefill"]
    prefill = tables.get("prefill", [])
    variants = sorted({c["flash_variant"] for c in prefill if c["flash_variant"]})
    parts.append(markdown_table(
        ["batch", "tokens", "flash", "ours", "flash TFLOP/s", "ours TFLOP/s", "ours/flash", "row0 = batch 1"],
        [[str(c["batch"]) + ("" if c["graphed"] else " †"), c["tokens"], fmt_time(c["flash_s"]),
          fmt_time(c["ours_s"]), fmt(c["flash_tflops"], ".0f"), fmt(c["ours_tflops"], ".0f"),
          fmt(c["ratio"], ".3f"), fmt_bool(c["row0_bitwise"])] for c in prefill]))
    if prefill:
        reference = f" SDPA reference: {'; '.join(variants)}." if variants else ""
        parts.append("Causal FLOPs = 4·B·Hq·L²·D/2." + reference)
        parts.append(targets_table(summary.get("prefill", {}).get("targets", [])))
    parts.append("### Decode from a paged cache")
    decode = tables.get("decode", [])
    if decode:
        variants = sorted({c["sdpa_variant"] for c in decode if c.get("sdpa_variant")})
        sdpa_max_batch = max((c["batch"] for c in decode if c.get("sdpa_s") is not None), default=None)
        rows = []
        for c in decode:
            if c["skipped"]:
                rows.append([c["kv_len"], c["batch"], fmt_bytes(c["kv_bytes"]), f"skipped: {c['skipped']}"]
                            + ["–"] * 7)
                continue
            rows.append([c["kv_len"], str(c["batch"]) + ("" if c["graphed"] else " †"), fmt_bytes(c["kv_bytes"]),
                         fmt_time(c["ours_s"]), fmt_time(c["floor_s"]), fmt(c["ours_gbps"], ".0f"),
                         fmt_pct(c["floor_fraction"]), fmt_time(c["sdpa_s"]), fmt(c["ratio_vs_sdpa"], ".2f"),
                         fmt_bool(c["row0_bitwise"]), fmt_bool(c["equals_prefill"])])
        parts.append(markdown_table(
            ["KV len", "batch", "KV bytes", "ours", "floor", "ours GB/s", "% of floor", "SDPA (contiguous)",
             "ours/SDPA", "row0 = batch 1", "= prefill"], rows))
        parts.append(
            "Floor = KV bytes / copy bandwidth; % of floor = floor / time. SDPA runs on a contiguous copy of the "
            f"same K/V (up to batch {fmt(sdpa_max_batch, 'd')}), informative"
            + (f" ({'; '.join(variants)})" if variants else "")
            + ". \"= prefill\" (batch 1): the decode output equals the last row of detcompile's causal prefill "
              "over the same keys.")
        parts.append(targets_table(summary.get("decode", {}).get("targets", [])))
    return "\n\n".join(parts)


def attention_summary(tables: dict) -> dict:
    return {"prefill": prefill_summary(tables.get("prefill", [])), "decode": decode_summary(tables.get("decode", []))}


# ------------------------------------------------------------------------------------------------
# Timing with CUDA graphs.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: float  #: median time of one call
    graphed: bool = True  #: False: the graph capture failed and the calls were timed eagerly (marked †)


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_of(o)]
    return []


def tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


def clone_tensors(args: tuple) -> tuple:
    """Fresh copies of the tensor arguments, same strides (a transposed weight stays transposed)."""
    return tuple(a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a for a in args)


def l2_cache_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def capture_graph(fn: Callable, arg_sets: list[tuple], calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    # The last outputs stay alive during the capture, so the output addresses rotate with the inputs.
    recent = collections.deque(maxlen=len(arg_sets))
    with torch.cuda.graph(graph):
        for i in range(calls):
            recent.append(fn(*arg_sets[i % len(arg_sets)]))
    return graph


def elapsed_seconds(work: Callable[[], None], repeats: int) -> list[float]:
    """CUDA-event time of ``work`` (GPU time, the host waits after each repeat)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


class GraphTimer:
    """``timer(fn, *args) -> Timing``: the median time of one call, replaying a CUDA graph of many.

    One graph holds about ``target_s`` of calls (at most ``max_calls``), cycling over copies of the
    tensor arguments whose total size is at least ``rotate_bytes`` (default 4x L2). A launcher that
    cannot be captured (a host sync) is timed eagerly instead, with a warning, and marked.
    """

    def __init__(self, target_s: float = 0.01, replays: int = 10, rotate_bytes: int | None = None,
                 max_calls: int = 1000, max_copies: int = 64):
        self.target_s, self.replays, self.max_calls, self.max_copies = target_s, replays, max_calls, max_copies
        self.rotate_bytes = 4 * l2_cache_bytes() if rotate_bytes is None else rotate_bytes
        self._side = torch.cuda.Stream()

    def __call__(self, fn: Callable, *args) -> Timing:
        out_bytes = tensor_bytes(self._warm_up(fn, args))
        copies = rotation_count(tensor_bytes(args) + out_bytes, self.rotate_bytes, self.max_copies)
        arg_sets = [args] + [clone_tensors(args) for _ in range(copies - 1)]
        try:
            return Timing(self._graph_seconds(fn, arg_sets), graphed=True)
        except RuntimeError as err:
            if "captur" not in str(err).lower():
                raise
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture failed for {getattr(fn, '__name__', fn)}; timing it eagerly "
                          f"(launch overhead included): {str(err).splitlines()[0]}")
            return Timing(self._eager_seconds(fn, arg_sets), graphed=False)

    def _warm_up(self, fn: Callable, args: tuple):
        # Compiles Triton kernels and creates library handles outside the graph; a side stream, as
        # torch.cuda.graph's documentation recommends before a capture.
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            fn(*args)
            out = fn(*args)
        torch.cuda.current_stream().wait_stream(self._side)
        torch.cuda.synchronize()
        return out

    def _graph_seconds(self, fn: Callable, arg_sets: list[tuple]) -> float:
        copies = len(arg_sets)
        graph = capture_graph(fn, arg_sets, copies)
        graph.replay()  # the first replay uploads the graph
        est = min(elapsed_seconds(graph.replay, 2)) / copies
        calls = calls_per_graph(est, self.target_s, copies, self.max_calls)
        if calls != copies:
            del graph
            graph = capture_graph(fn, arg_sets, calls)
            graph.replay()
        return statistics.median(t / calls for t in elapsed_seconds(graph.replay, self.replays))

    def _eager_seconds(self, fn: Callable, arg_sets: list[tuple]) -> float:
        def run(calls):
            for i in range(calls):
                fn(*arg_sets[i % len(arg_sets)])

        est = min(elapsed_seconds(lambda: run(len(arg_sets)), 2)) / len(arg_sets)
        calls = calls_per_graph(est, self.target_s, len(arg_sets), self.max_calls)
        return statistics.median(t / calls for t in elapsed_seconds(lambda: run(calls), self.replays))


# ------------------------------------------------------------------------------------------------
# Running the sections.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    device: torch.device
    timer: Callable[..., Timing]
    copy_gbps: float
    show_progress: bool = True

    def progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, disable=not self.show_progress)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=DTYPE, device=self.device)


@dataclasses.dataclass
class Section:
    name: str
    tables: dict = dataclasses.field(default_factory=dict)  #: table name -> records; filled as cells finish
    notes: list = dataclasses.field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def summary(self) -> dict:
        if self.name == "matmul":
            return matmul_summary(self.tables.get("cells", []))
        if self.name == "norms":
            return norms_summary(self.tables.get("cells", []))
        return attention_summary(self.tables)

    def markdown(self) -> str:
        title = {"matmul": "Matmul, bf16, Llama-3-8B weight shapes",
                 "norms": "RMSNorm, softmax and log_softmax, bf16",
                 "attention": "Attention, bf16"}[self.name]
        body = {"matmul": matmul_markdown, "norms": norms_markdown,
                "attention": attention_markdown}[self.name](self.tables, self.summary())
        parts = [f"## {title}", body]
        if any(not r.get("graphed", True) for rows in self.tables.values() for r in rows):
            parts.append("† CUDA graph capture failed for this row; timed eagerly, launch overhead included.")
        parts += self.notes
        if self.error:
            parts.append(f"**Section stopped by an error**: `{self.error}` (the rows above were measured).")
        parts.append(f"Section wall time: {self.seconds:.0f} s.")
        return "\n\n".join(parts)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def measure_copy_bandwidth(timer: Callable[..., Timing], device: torch.device, nbytes: int) -> dict:
    # randn, not zeros: memory compression could make zeros cheaper to move.
    src = torch.randn(nbytes // 2, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda s, d: d.copy_(s), src, dst)
    return {"bytes": nbytes, "seconds": t.seconds, "gbps": gbps(2 * nbytes, t.seconds), "graphed": t.graphed}


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


def ours_attention(q, k, v, is_causal=True):
    return torch.ops.detcompile.attention(q, k, v, None, is_causal, None, True, 0.0)


def sdpa_function(backends: list, is_causal: bool, enable_gqa: bool) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def sdpa(q, k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=enable_gqa)

    return sdpa


def choose_sdpa(q, k, v, is_causal: bool, backends: list, label: str) -> tuple[Callable, bool, str]:
    """(fn, repeat_kv, how it ran): SDPA with enable_gqa if the backend takes it, else with K/V repeated
    to the query heads before timing. Probed on a 16-token slice: support does not depend on length."""
    lq = min(q.shape[2], 16)
    probe = q[:1, :, :lq], k[:1, :, :16], v[:1, :, :16]
    group = q.shape[1] // k.shape[1]
    with warnings.catch_warnings():  # a refusing backend warns before it raises
        warnings.simplefilter("ignore")
        try:
            gqa = sdpa_function(backends, is_causal, True)
            gqa(*probe)
            return gqa, False, f"{label}, enable_gqa=True"
        except RuntimeError:
            plain = sdpa_function(backends, is_causal, False)
            plain(probe[0], probe[1].repeat_interleave(group, 1), probe[2].repeat_interleave(group, 1))
            return plain, True, (f"{label} refused enable_gqa: K/V repeated to {q.shape[1]} heads before timing "
                                 "(the repeat is not timed)")


def time_sdpa(ctx: Context, q, k, v, is_causal: bool, backends: list, label: str) -> tuple[Timing | None, str]:
    """Time the SDPA reference; (None, why) if no variant runs."""
    try:
        fn, repeat_kv, variant = choose_sdpa(q, k, v, is_causal, backends, label)
    except RuntimeError as err:
        return None, f"{label} unavailable: {str(err).splitlines()[0][:200]}"
    if repeat_kv:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return ctx.timer(fn, q, k, v), variant


def run_prefill(ctx: Context, grid: Grid, section: Section) -> None:
    from torch.nn.attention import SDPBackend

    cells = section.tables.setdefault("prefill", [])
    by_len: dict[int, list[int]] = collections.defaultdict(list)
    for batch, length in grid.prefill_cases:
        by_len[length].append(batch)
    hq, hkv, d = grid.heads_q, grid.heads_kv, grid.head_dim
    with ctx.progress(len(grid.prefill_cases), "attention prefill") as bar:
        for length, batches in by_len.items():
            q_all, k_all, v_all = (ctx.randn(max(batches), h, length, d) for h in (hq, hkv, hkv))
            alone = ours_attention(q_all[:1], k_all[:1], v_all[:1])
            for batch in batches:
                bar.set_postfix_str(f"B={batch} L={length}")
                q, k, v = q_all[:batch], k_all[:batch], v_all[:batch]
                row0 = row0_matches(ours_attention(q, k, v), alone) if batch > 1 else None
                ours_t = ctx.timer(ours_attention, q, k, v)
                flash_t, variant = time_sdpa(ctx, q, k, v, True, [SDPBackend.FLASH_ATTENTION], "SDPA flash")
                cells.append(prefill_record(batch, length, hq, d, ours_t, flash_t, row0, variant))
                bar.update()
            del q_all, k_all, v_all, alone
            free_memory(ctx.device)


def find_paged_attention() -> Callable | None:
    """``detcompile.kernels.paged_attention.paged_attention``, or None while it does not exist."""
    return getattr(importlib.import_module("detcompile.kernels.paged_attention"), "paged_attention", None)


@dataclasses.dataclass
class PagedCache:
    k: torch.Tensor  #: [pages, page_size, H_kv, D]
    v: torch.Tensor
    block_table: torch.Tensor  #: int32 [B, pages_per_seq]
    kv_lens: torch.Tensor  #: int32 [B]


def make_paged_cache(ctx: Context, grid: Grid, batch: int, kv_len: int) -> PagedCache:
    pages_per_seq = math.ceil(kv_len / grid.page_size)
    shape = (batch * pages_per_seq, grid.page_size, grid.heads_kv, grid.head_dim)
    return PagedCache(
        k=ctx.randn(*shape), v=ctx.randn(*shape),
        block_table=make_block_table(batch, pages_per_seq, ctx.device),
        kv_lens=torch.full((batch,), kv_len, dtype=torch.int32, device=ctx.device),
    )


def decode_cell_fits(kv_bytes: int, grid: Grid, batch: int, free: int | None) -> str:
    """'' if the cell runs, else why not: the cap, or free memory for the cache (and its contiguous copy)."""
    if kv_bytes > grid.decode_max_cache_bytes:
        return f"cache over {grid.decode_max_cache_bytes / GB:.0f} GB"
    copies = 2 if batch <= grid.sdpa_decode_max_batch else 1
    if free is not None and kv_bytes * copies + 2 * GB > free:
        return "not enough free GPU memory"
    return ""


def run_decode(ctx: Context, grid: Grid, section: Section) -> None:
    from torch.nn.attention import SDPBackend

    paged = find_paged_attention()
    if paged is None:
        section.notes.append("Decode: skipped: paged_attention not available "
                             "(`detcompile.kernels.paged_attention.paged_attention` does not exist yet).")
        return
    cells = section.tables.setdefault("decode", [])
    hq, hkv, d = grid.heads_q, grid.heads_kv, grid.head_dim
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with ctx.progress(len(grid.decode_kv_lens) * len(grid.decode_batches), "attention decode") as bar:
        for kv_len in grid.decode_kv_lens:
            for batch in grid.decode_batches:
                bar.set_postfix_str(f"KV {kv_len} B={batch}")
                kv_bytes = kv_cache_bytes(batch, kv_len, hkv, d)
                why_not = decode_cell_fits(kv_bytes, grid, batch, free_bytes(ctx.device))
                if why_not:
                    cells.append(skipped_decode_record(kv_len, batch, kv_bytes, why_not))
                else:
                    cells.append(decode_cell(ctx, grid, paged, backends, kv_len, batch, kv_bytes))
                free_memory(ctx.device)
                bar.update()


def decode_cell(ctx: Context, grid: Grid, paged: Callable, backends: list, kv_len: int, batch: int,
                kv_bytes: int) -> dict:
    cache = make_paged_cache(ctx, grid, batch, kv_len)
    q = ctx.randn(batch, grid.heads_q, 1, grid.head_dim)  # each query sits at position kv_len - 1

    def step(q, k_cache, v_cache, block_table, kv_lens):
        return paged(q, k_cache, v_cache, block_table, kv_lens)

    out = step(q, cache.k, cache.v, cache.block_table, cache.kv_lens)
    row0 = None
    if batch > 1:
        alone = step(q[:1], cache.k, cache.v, cache.block_table[:1], cache.kv_lens[:1])
        row0 = row0_matches(out, alone)
    ours_t = ctx.timer(step, q, cache.k, cache.v, cache.block_table, cache.kv_lens)

    sdpa_t, variant, equals_prefill = None, None, None
    if batch <= grid.sdpa_decode_max_batch:
        k = gather_pages(cache.k, cache.block_table, kv_len)
        v = gather_pages(cache.v, cache.block_table, kv_len)
        del cache  # the contiguous copy replaces it
        free_memory(ctx.device)
        if batch == 1:
            equals_prefill = decode_equals_prefill(ctx, q, k, v, out)
        sdpa_t, variant = time_sdpa(ctx, q, k, v, False, backends, "SDPA flash/efficient")
    return decode_record(kv_len, batch, kv_bytes, ours_t, sdpa_t, variant, row0, equals_prefill, ctx.copy_gbps)


def decode_equals_prefill(ctx: Context, q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          decoded: torch.Tensor) -> bool:
    """Whether decode gives the bits of the last row of detcompile's causal prefill over the same keys
    (the promise that lets a sampler's decode match a trainer's prefill)."""
    q = ctx.randn(1, q_last.shape[1], k.shape[2], q_last.shape[3])
    q[:, :, -1:] = q_last[:1]
    return same_bits(ours_attention(q, k, v)[:, :, -1:], decoded[:1])


def run_attention(ctx: Context, grid: Grid, section: Section) -> None:
    run_prefill(ctx, grid, section)
    run_decode(ctx, grid, section)


RUNNERS = {"matmul": run_matmul, "norms": run_norms, "attention": run_attention}


def run_section(name: str, ctx: Context, grid: Grid) -> Section:
    """Run one section; an error stops that section only (its finished rows are kept)."""
    section = Section(name)
    start = time.perf_counter()
    try:
        RUNNERS[name](ctx, grid, section)
    except Exception as err:  # noqa: BLE001 - report and go on with the next section
        traceback.print_exc()
        section.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    section.seconds = time.perf_counter() - start
    free_memory(ctx.device)
    return section


# ------------------------------------------------------------------------------------------------
# Plots.
# ------------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a warning) if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(ax, ticks: Sequence[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


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
    _log2_axis(ax_ratio, sorted({c["M"] for c in cells}), "M (rows)")
    ax_bw.axhline(100 * MATMUL_DECODE_BW_TARGET, color="red", ls=":", label="target")
    ax_bw.set_ylabel("% of copy bandwidth")
    _log2_axis(ax_bw, sorted({c["M"] for c in cells if c["M"] <= MATMUL_DECODE_MAX_M}) or [1], "M (rows)")
    ax_ratio.legend(fontsize=7)
    ax_bw.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    return fig


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
        _log2_axis(ax, sorted({c["tokens"] for c in rows}) or [1], "T (rows)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def plot_attention(plt, tables: dict, title: str):
    prefill = tables.get("prefill", [])
    decode = [c for c in tables.get("decode", []) if not c["skipped"]]
    fig, (ax_pre, ax_dec) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = range(len(prefill))
    ax_pre.bar([x - 0.2 for x in xs], [c["flash_tflops"] or 0 for c in prefill], 0.4, label="SDPA flash")
    ax_pre.bar([x + 0.2 for x in xs], [c["ours_tflops"] for c in prefill], 0.4, label="ours")
    ax_pre.set_xticks(list(xs), [f"B={c['batch']} L={c['tokens']}" for c in prefill])
    ax_pre.set_ylabel("TFLOP/s (causal)")
    ax_pre.set_title("causal prefill", fontsize=9)
    ax_pre.legend(fontsize=8)
    if decode:
        for i, kv_len in enumerate(dict.fromkeys(c["kv_len"] for c in decode)):
            rows = [c for c in decode if c["kv_len"] == kv_len]
            ax_dec.plot([c["batch"] for c in rows], [100 * c["floor_fraction"] for c in rows], "o-", color=f"C{i}",
                        label=f"KV {kv_len}")
        ax_dec.axhline(100 * DECODE_FLOOR_TARGET, color="red", ls=":",
                       label=f"target (batch >= {DECODE_TARGET_MIN_BATCH})")
        _log2_axis(ax_dec, sorted({c["batch"] for c in decode}), "batch")
        ax_dec.legend(fontsize=7)
    else:
        ax_dec.text(0.5, 0.5, "decode: not measured\n(paged_attention not available)", ha="center", va="center",
                    transform=ax_dec.transAxes)
    ax_dec.set_ylabel("% of bandwidth floor")
    ax_dec.set_title("decode from a paged cache", fontsize=9)
    fig.suptitle(title, fontsize=9)
    return fig


PLOTTERS = {"matmul": plot_matmul, "norms": plot_norms, "attention": plot_attention}


def write_plot(plt, section: Section, path: Path, env: dict) -> None:
    title = (f"detcompile {section.name} (issue #3): {env['device_name']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']}")
    fig = PLOTTERS[section.name](plt, section.tables, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Reports.
# ------------------------------------------------------------------------------------------------


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment(device: torch.device, argv: Sequence[str], grid_name: str, timer_desc: str) -> dict:
    from benchmarks.model_sweep import git_commit

    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "python": platform.python_version(),
        "commit": git_commit() or "unknown",
        "command": " ".join(["python -m benchmarks.kernels", *argv]),
        "grid": grid_name,
        "timing": timer_desc,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"], env["memory_gb"] = props.multi_processor_count, round(props.total_memory / GB, 1)
    return env


def render_markdown(env: dict, copy: dict, sections: list[Section], plots: dict[str, str], wall_s: float) -> str:
    lines = [
        "# Kernel speed (issue #3)",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device_name']}"
        + (f" ({env['sm_count']} SMs, {env['memory_gb']} GB)" if "sm_count" in env else ""),
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}",
        f"- detcompile commit: {env['commit']}",
        f"- command: `{env['command']}` ({env['grid']} grid), wall time {wall_s:.0f} s",
        f"- timing: {env['timing']}",
        f"- copy bandwidth (`dst.copy_(src)`, {copy['bytes'] / 2**30:.0f} GiB bf16, read + write): "
        f"**{copy['gbps']:.0f} GB/s**; every % below is of this figure",
    ]
    for section in sections:
        lines += ["", section.markdown()]
        if section.name in plots:
            lines += ["", f"![{section.name}]({plots[section.name]})"]
    return "\n".join(lines) + "\n"


def report_json(env: dict, copy: dict, grid: Grid, sections: list[Section], wall_s: float) -> dict:
    return {
        "environment": env,
        "copy_bandwidth": copy,
        "grid": dataclasses.asdict(grid),
        "wall_s": round(wall_s, 1),
        "sections": {s.name: {"tables": s.tables, "summary": s.summary(), "notes": s.notes, "error": s.error,
                              "seconds": round(s.seconds, 1)} for s in sections},
    }


def write_reports(out: Path, env: dict, copy: dict, grid: Grid, sections: list[Section], wall_s: float,
                  plt=None) -> list[Path]:
    """Write <out>.md, <out>.json and a PNG per section (when plt is given); returns the paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written, plots = [], {}
    if plt is not None:
        for section in sections:
            png = out.parent / f"{out.name}_{section.name}.png"
            write_plot(plt, section, png, env)
            plots[section.name] = png.name
            written.append(png)
    md, js = out.parent / f"{out.name}.md", out.parent / f"{out.name}.json"
    md.write_text(render_markdown(env, copy, sections, plots, wall_s))
    js.write_text(json.dumps(report_json(env, copy, grid, sections, wall_s), indent=1) + "\n")
    return [md, js] + written


# ------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------


def parse_sections(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=parse_sections, default=list(SECTIONS), metavar="SECTIONS",
                   help=f"comma-separated sections to run: {','.join(SECTIONS)} (default: all; the copy "
                        "bandwidth is always measured)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and replays (under 90 s)")
    p.add_argument("--out", default="docs/benchmarks_kernels",
                   help="report path without suffix: writes <out>.md, <out>.json, <out>_<section>.png "
                        "(default %(default)s)")
    p.add_argument("--page-size", type=positive_int, default=16,
                   help="tokens per page of the paged KV cache (default 16)")
    return p.parse_args(argv)


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
                  f"{timer.rotate_bytes / 2**20:.0f} MiB (4x L2)")
    env = environment(device, argv, "quick" if args.quick else "full", timer_desc)
    plt = pyplot()

    copy = measure_copy_bandwidth(timer, device, grid.copy_bytes)
    print(f"copy bandwidth: {copy['gbps']:.0f} GB/s ({env['device_name']})", flush=True)
    ctx = Context(device, timer, copy["gbps"])
    out, sections = Path(args.out), []
    written = write_reports(out, env, copy, grid, sections, time.perf_counter() - start, plt)
    for name in args.only:
        sections.append(run_section(name, ctx, grid))
        print("\n" + sections[-1].markdown() + "\n", flush=True)
        written = write_reports(out, env, copy, grid, sections, time.perf_counter() - start, plt)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
