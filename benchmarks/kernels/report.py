"""The report files: ``<out>.md``, ``<out>.json`` and a PNG per section."""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.kernels.attention import plot_attention
from benchmarks.kernels.bandwidth import ceiling_line, ceiling_markdown
from benchmarks.kernels.matmul import plot_matmul
from benchmarks.kernels.measures import GB
from benchmarks.kernels.norms import plot_norms
from benchmarks.kernels.sections import Section
from benchmarks.kernels.shapes import Grid


PLOTTERS = {"matmul": plot_matmul, "norms": plot_norms, "attention": plot_attention}


def write_plot(plt, section: Section, path: Path, env: dict) -> None:
    title = (f"detcompile {section.name} (issue #3): {env['device_name']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']}")
    fig = PLOTTERS[section.name](plt, section.tables, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


#: record keys that are a fraction of the bandwidth ceiling (bytes moved / time / ceiling)
CEILING_FRACTIONS = ("ours_copy_fraction", "torch_copy_fraction", "cublas_copy_fraction", "floor_fraction")
ABOVE_CEILING_TOLERANCE = 1.05  # run-to-run spread of a few percent


def above_ceiling(sections: list[Section], tolerance: float = ABOVE_CEILING_TOLERANCE) -> list[str]:
    """The figures over ``tolerance`` x the ceiling, as "section key = x%": none should be, since every
    GB/s counts the bytes a kernel must move at least; one that is says the ceiling is too low."""
    found = []
    for section in sections:
        for rows in section.tables.values():
            for row in rows:
                for key in CEILING_FRACTIONS:
                    value = row.get(key)
                    if value is not None and value > tolerance:
                        found.append(f"{section.name} {key} = {100 * value:.0f}%")
    return found


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
        f"- {ceiling_line(copy)}",
    ]
    details = ceiling_markdown(copy)
    if details:
        lines += ["", "Bandwidth ceiling: each operation over the same buffer, timed by the kernels' graph timer "
                  "and eagerly (back-to-back launches between CUDA events); GB/s = bytes moved / time. The "
                  "\"% copy\" columns and the decode floor below use the best figure.", "", details]
    over = above_ceiling(sections)
    if over:
        lines += ["", f"**{len(over)} figure(s) above {ABOVE_CEILING_TOLERANCE:.0%} of the ceiling** (the ceiling "
                  f"is too low, or a byte count too high): {', '.join(over[:10])}"
                  + (", ..." if len(over) > 10 else "")]
    for section in sections:
        lines += ["", section.markdown()]
        if section.name in plots:
            lines += ["", f"![{section.name}]({plots[section.name]})"]
    return "\n".join(lines) + "\n"


def report_json(env: dict, copy: dict, grid: Grid, sections: list[Section], wall_s: float) -> dict:
    return {
        "environment": env,
        "copy_bandwidth": copy,
        "above_ceiling": above_ceiling(sections),
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
