"""Formatting of numbers, markdown tables and target lines (pure: tested on the CPU)."""
from __future__ import annotations

from typing import Callable, Sequence

from benchmarks.kernels.measures import GB


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


def floor_target(description: str, worst: dict | None, key: str, floor: float,
                 measured: Callable[[dict], str]) -> dict:
    """A target every judged cell must reach (``cell[key] >= floor``), judged by the worst one;
    ``measured(worst)`` describes it. None: no cell was judged."""
    if worst is None:
        return target(description, "–", None)
    return target(description, measured(worst), worst[key] >= floor)


def bitwise_target(description: str, cells: list[dict], key: str = "row0_bitwise") -> dict:
    """Row 0 of every cell has the bits it has alone (``cell[key]``); None: no cell was checked."""
    return target(description, f"{sum(c[key] for c in cells)}/{len(cells)}",
                  all(c[key] for c in cells) if cells else None)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets_table(targets: list[dict]) -> str:
    return markdown_table(["target", "measured", "result"],
                          [[t["target"], t["measured"], verdict(t["pass"])] for t in targets])
