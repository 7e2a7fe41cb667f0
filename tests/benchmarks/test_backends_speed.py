"""benchmarks/backends_speed.py on the CPU: the tiny model with the Triton backend through the attention
and batch-1 parts (the profiler finds the attention ops, times are positive), and a backend that is not
installed recorded as skipped with its reason. No speed is judged here: that needs the GPU."""
import json

import pytest
import torch

from benchmarks import backends_speed as bs

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; the GPU runs the real benchmark")
def test_tiny_run_reports_attention_times_and_skips_missing_backends(tmp_path):
    missing = "fa3"
    try:
        import fa3_fwd_interface  # noqa: F401
        pytest.skip("fa3-fwd is installed here")
    except ImportError:
        pass
    res = bs.main(["--model", "tiny", "--backends", f"triton,{missing}", "--parts", "attention,decode1",
                   "--out", str(tmp_path)])
    tri = res["backends"]["triton"]
    assert not tri["errors"], tri["errors"]
    att = tri["attention"]
    for key in ("prefill", "decode_1", "decode_32"):
        assert att[key]["attention_us"] > 0, key
        assert att[key]["attention_kernels"], key  # the name pattern found the attention ops
        assert all(bs.ATTENTION_KERNEL.search(k) for k in att[key]["attention_kernels"])
        assert att[key]["attention_us"] <= att[key]["step_kernels_us"]
    assert tri["decode1"]["decode_tok_s"] > 0
    assert "fa3-fwd" in res["backends"][missing]["skipped"]
    saved = json.loads((tmp_path / "backends_speed.json").read_text())
    assert set(saved["backends"]) == {"triton", missing}
    md = (tmp_path / "backends_speed.md").read_text()
    assert "| triton |" in md and "skipped" in md
