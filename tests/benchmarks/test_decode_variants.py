"""benchmarks/decode_variants.py on the CPU (tiny model): variants parsed, one row each with the
same tokens (the switches only change GPU launches), report files written, the environment restored."""
import json
import os

import pytest

from benchmarks import decode_variants


def test_parse_variants():
    assert decode_variants.parse_variants("a=X=1+Y=2; b=") == [("a", {"X": "1", "Y": "2"}), ("b", {})]
    assert [n for n, _ in decode_variants.parse_variants(decode_variants.DEFAULT_VARIANTS)][-1] == "base again"
    with pytest.raises(ValueError, match="VAR=value"):
        decode_variants.parse_variants("a=X")
    with pytest.raises(ValueError, match="no variants"):
        decode_variants.parse_variants(" ; ")


def test_rows_tokens_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DETCOMPILE_PDL", "1")
    monkeypatch.delenv("DETCOMPILE_TEST_UNSET", raising=False)
    res = decode_variants.main(["--model", "tiny", "--variants", "base=;both=DETCOMPILE_PDL=0+"
                                "DETCOMPILE_TEST_UNSET=1", "--batch", "2", "--tokens", "3", "--out", str(tmp_path)])
    assert [r["variant"] for r in res["rows"]] == ["base", "both"]
    assert all(r["tok_per_s"] > 0 and r["same_tokens_as_first"] for r in res["rows"])
    assert json.loads((tmp_path / "decode_variants.json").read_text())["rows"] == res["rows"]
    assert "DETCOMPILE_TEST_UNSET=1" in (tmp_path / "decode_variants.md").read_text()
    assert os.environ["DETCOMPILE_PDL"] == "1" and "DETCOMPILE_TEST_UNSET" not in os.environ
