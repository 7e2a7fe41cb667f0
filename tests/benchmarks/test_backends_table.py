"""benchmarks/backends_table.py: the reference table from JUnit files (a cell is ✓ only when its test passed)."""
from benchmarks.backends_table import table

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.engine.test_backends_gpu" name="test_cuda_graph_equals_eager[fa3]" time="1.0"/>
<testcase classname="tests.engine.test_backends_gpu" name="test_chunked_prefill_equals_unchunked[fa3]" time="1.0">
<failure message="AssertionError: assert [(1, 2)] == [(1, 3)]&#10;more">trace</failure></testcase>
<testcase classname="tests.engine.test_backends_gpu" name="test_radix_cache_hit_equals_uncached[fa3]" time="1.0">
<skipped message="needs a CUDA GPU">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_table_marks_only_passed_cells(tmp_path):
    (tmp_path / "backends_fa3.xml").write_text(JUNIT)
    (tmp_path / "import_flashinfer.txt").write_text("Traceback...\nModuleNotFoundError: No module named 'flashinfer'\n")
    lines = table(tmp_path, ["fa3", "flashinfer", "triton"]).splitlines()
    assert lines[2].startswith("| fa3 | ✓ | ✗ [1] | skipped [2] | not-run [3] |")
    assert lines[3].startswith("| flashinfer | skipped [4] |") and lines[4].startswith("| triton | not-run [5] |")
    notes = "\n".join(lines[5:])
    assert "[1] AssertionError: assert [(1, 2)] == [(1, 3)]\n" in notes and "[2] needs a CUDA GPU" in notes
    assert "No module named 'flashinfer'" in notes and "timed out" in notes
