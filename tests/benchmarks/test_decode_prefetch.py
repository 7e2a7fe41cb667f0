"""benchmarks/decode_prefetch.py on the CPU (tiny model): one row per budget, the same tokens for
each (the budget only changes GPU launches), the report files written, the variable restored."""
import json
import os

from benchmarks import decode_prefetch
from detcompile.kernels import _pdl


def test_rows_tokens_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv(_pdl.PREFETCH_ENV, "3")
    res = decode_prefetch.main(["--model", "tiny", "--mb", "0,8", "--tokens", "3", "--out", str(tmp_path)])
    assert [r["prefetch_mb"] for r in res["rows"]] == [0.0, 8.0]
    assert all(r["tok_per_s"] > 0 and r["same_tokens_as_first"] for r in res["rows"])
    assert json.loads((tmp_path / "decode_prefetch.json").read_text())["rows"] == res["rows"]
    assert "| 8 |" in (tmp_path / "decode_prefetch.md").read_text()
    assert os.environ[_pdl.PREFETCH_ENV] == "3"
