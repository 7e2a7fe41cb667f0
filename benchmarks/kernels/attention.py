"""Attention section: causal prefill against SDPA flash, decode from a paged cache against the
bandwidth floor."""
from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import warnings
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

import detcompile  # noqa: F401  (registers torch.ops.detcompile.*)
from benchmarks.kernels.context import Context, free_bytes, free_memory
from benchmarks.kernels.measures import GB, gbps, geomean, row0_matches, same_bits, speed_ratio, tflops
from benchmarks.kernels.plots import log2_axis
from benchmarks.kernels.shapes import Grid
from benchmarks.kernels.tables import (
    bitwise_target, floor_target, fmt, fmt_bool, fmt_bytes, fmt_pct, fmt_time, markdown_table, targets_table,
)
from benchmarks.kernels.timing import Timing

if TYPE_CHECKING:  # sections imports this module
    from benchmarks.kernels.sections import Section


# Targets of issue #3 (H100, bf16).
PREFILL_TARGET = 0.8  # ours/flash, every cell
DECODE_FLOOR_TARGET = 0.8  # fraction of the bandwidth floor, every cell with batch >= DECODE_TARGET_MIN_BATCH
DECODE_TARGET_MIN_BATCH = 32


def causal_attention_flops(batch: int, heads_q: int, length: int, head_dim: int) -> float:
    """FLOPs of causal attention (QK^T and PV, 2 flops per multiply-add, half the square visible)."""
    return 4 * batch * heads_q * length * length * head_dim / 2


def kv_cache_bytes(batch: int, kv_len: int, heads_kv: int, head_dim: int, itemsize: int = 2) -> int:
    """Bytes of the keys and values one decode step must read."""
    return 2 * batch * kv_len * heads_kv * head_dim * itemsize


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
            floor_target(f"every cell >= {PREFILL_TARGET}x SDPA flash", worst, "ratio", PREFILL_TARGET,
                         lambda c: f"min {c['ratio']:.3f} (B={c['batch']}, L={c['tokens']})"),
            bitwise_target("batch row 0 bitwise equal to batch 1", checked),
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
            floor_target(f"batch >= {DECODE_TARGET_MIN_BATCH}: every cell >= {DECODE_FLOOR_TARGET:.0%} of the "
                         "bandwidth floor", worst, "floor_fraction", DECODE_FLOOR_TARGET,
                         lambda c: f"min {fmt_pct(c['floor_fraction'])} (KV {c['kv_len']}, batch {c['batch']})"),
            bitwise_target("batch row 0 bitwise equal to batch 1", checked),
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
            "Floor = KV bytes / bandwidth ceiling; % of floor = floor / time. SDPA runs on a contiguous copy of the "
            f"same K/V (up to batch {fmt(sdpa_max_batch, 'd')}), informative"
            + (f" ({'; '.join(variants)})" if variants else "")
            + ". \"= prefill\" (batch 1): the decode output equals the last row of detcompile's causal prefill "
              "over the same keys.")
        parts.append(targets_table(summary.get("decode", {}).get("targets", [])))
    return "\n\n".join(parts)


def attention_summary(tables: dict) -> dict:
    return {"prefill": prefill_summary(tables.get("prefill", [])), "decode": decode_summary(tables.get("decode", []))}


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
        log2_axis(ax_dec, sorted({c["batch"] for c in decode}), "batch")
        ax_dec.legend(fontsize=7)
    else:
        ax_dec.text(0.5, 0.5, "decode: not measured\n(paged_attention not available)", ha="center", va="center",
                    transform=ax_dec.transAxes)
    ax_dec.set_ylabel("% of bandwidth floor")
    ax_dec.set_title("decode from a paged cache", fontsize=9)
    fig.suptitle(title, fontsize=9)
    return fig
