"""The reference table of docs/attention_backends.md from the GPU run's JUnit files
(``benchmarks/backends_gpu_check.sh`` writes ``$OUT/backends_<name>.xml``, one per backend).

A cell is ✓ only when its test passed; ✗ carries the first line of the failure; a skipped test
says why; a backend whose package did not import, or whose run timed out, says so.

Usage: python benchmarks/backends_table.py OUT_DIR [BACKEND ...]
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BACKENDS = ("triton", "fa3", "flashinfer")
#: test function -> column (the issue's five cells first)
CELLS = {
    "test_cuda_graph_equals_eager": "CUDA graph",
    "test_chunked_prefill_equals_unchunked": "chunked prefill",
    "test_radix_cache_hit_equals_uncached": "radix cache",
    "test_non_greedy_sampling_in_any_batch": "non-greedy sampling",
    "test_prefill_equals_decode": "prefill = decode",
    "test_greedy_in_any_batch": "any batch (greedy)",
    "test_head_dim_128": "head dim 128",
    "test_numerically_close_to_the_models_own_attention": "close to the model's attention",
}


def _short(text: str | None, n: int = 90) -> str:
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    line = line.replace("|", "/")
    return line if len(line) <= n else line[: n - 1] + "…"


def results(xml_path: Path) -> dict[str, str]:
    """column -> cell text of one backend's run."""
    cells = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        m = re.match(r"(test_\w+)\[", case.get("name", ""))
        if not m or m.group(1) not in CELLS:
            continue
        col = CELLS[m.group(1)]
        failed = case.find("failure")
        if failed is None:
            failed = case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            cells[col] = "✗ " + _short(failed.get("message") or failed.text)
        elif skipped is not None:
            cells[col] = "skipped: " + _short(skipped.get("message"))
        else:
            cells[col] = "✓"
    return cells


def table(out: Path, backends=BACKENDS) -> str:
    """A markdown table (✓, ✗ [n], skipped [n], not run [n]) and its numbered notes."""
    cols = list(CELLS.values())
    lines = ["| backend | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    notes: list[str] = []

    def cell(text: str) -> str:
        if text == "✓":
            return text
        kind, _, why = text.partition(" ")
        if why not in notes:
            notes.append(why)
        return f"{kind} [{notes.index(why) + 1}]"

    for b in backends:
        xml = out / f"backends_{b}.xml"
        imp = out / f"import_{b}.txt"
        if xml.exists():
            got = results(xml)
            row = [got.get(c, "not-run (no test result)") for c in cols]
        elif imp.exists() and imp.read_text().strip():
            row = ["skipped: package did not import: " + _short(imp.read_text().strip().splitlines()[-1])] * len(cols)
        else:
            row = ["not-run (no results: the run timed out or was not selected)"] * len(cols)
        lines.append(f"| {b} | " + " | ".join(cell(c.replace("skipped: ", "skipped ", 1)) for c in row) + " |")
    lines += [""] + [f"[{i}] {why}" for i, why in enumerate(notes, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(Path(sys.argv[1]), sys.argv[2:] or BACKENDS))
