"""Running one section; an error stops that section only."""
from __future__ import annotations

import dataclasses
import time
import traceback

from benchmarks.kernels.attention import attention_markdown, attention_summary, run_attention
from benchmarks.kernels.context import Context, free_memory
from benchmarks.kernels.matmul import matmul_markdown, matmul_summary, run_matmul
from benchmarks.kernels.norms import norms_markdown, norms_summary, run_norms
from benchmarks.kernels.shapes import Grid


SECTIONS = ("matmul", "norms", "attention")


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
