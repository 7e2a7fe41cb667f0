"""benchmarks/engine.py on the CPU: a tiny random Llama through every part with very small sizes (the
plumbing from the engine to the JSON/markdown reports, sane numbers, the determinism checks), two runs
giving the same deterministic tokens, and the pure helpers. No speed is checked here: that needs the GPU."""
import json

import pytest
import torch

from benchmarks import engine as eb

pytestmark = pytest.mark.filterwarnings("ignore:no plot")  # matplotlib is optional


def small_sizes() -> eb.Sizes:
    return eb.Sizes(decode_prompt=8, decode_new=6, decode_repeats=1, concurrency=(2, 4), prompt_range=(4, 24),
                    output_range=(2, 6), warmup_requests=2, warmup_new=2, hf_batch=2, hf_new=4, hf_max_prompt=16,
                    ttft_lengths=(8, 24), ttft_repeats=1, max_num_seqs=4, chunked_prefill_size=32,
                    kv_cache_bytes=4 << 20, bandwidth_bytes=4 << 20, bandwidth_repeats=3, budget_s=None,
                    deadline_s=None, estimates={})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_bench")
    res = eb.run_benchmark("tiny", eb.PARTS, out, small_sizes(), seed=3, argv=["--model", "tiny"], quiet=True)
    return out, res


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and x == x and x != float("inf")


def test_every_part_reports_sane_numbers(first_run):
    out, res = first_run
    saved = json.loads((out / "engine_bench.json").read_text())
    assert saved["errors"] == {}, saved["errors"]
    assert saved["skipped"] == {}
    for key in ("env", "sizes", "model_info", "bandwidth", "engines", "decode1", "ttft", "throughput", "hf",
                "startup", "checks", "targets", "wall_seconds"):
        assert key in saved, key
    for key in ("date", "device_name", "torch", "triton", "transformers"):
        assert saved["env"][key], key

    assert _positive(saved["model_info"]["weight_bytes"]) and _positive(saved["bandwidth"]["gbps"])
    d1 = saved["decode1"]
    for mode in ("deterministic", "stock"):
        assert d1[mode]["new_tokens"] == 6
        assert _positive(d1[mode]["decode_tok_s"]) and _positive(d1[mode]["t_first_token_s"])
    assert _positive(d1["roofline_tok_s"]) and _positive(d1["det_over_stock"])

    tp = saved["throughput"]
    for mode in ("deterministic", "stock"):
        for n in ("2", "4"):
            rec = tp[mode][n]
            assert rec["requests"] == int(n)
            assert rec["output_tokens"] == rec["expected_output_tokens"] > 0  # ignore_eos: every token generated
            assert _positive(rec["output_tok_s"]) and _positive(rec["seconds"])
    for n in ("2", "4"):
        assert _positive(tp["det_over_stock"][n]) and _positive(tp["det_over_hf"][n])

    assert saved["hf"]["batch"] == 2 and saved["hf"]["new_tokens"] == 4 and _positive(saved["hf"]["output_tok_s"])
    for label in ("det_cold", "stock", "det_warm"):
        assert saved["engines"][label]["startup_seconds"] >= 0
    assert _positive(saved["startup"]["cold_seconds"]) and saved["startup"]["warm_seconds"] >= 0
    for mode in ("deterministic", "stock"):
        assert set(saved["ttft"][mode]) == {"8", "24"}
        assert all(_positive(r["seconds"]) for r in saved["ttft"][mode].values())

    # deterministic mode: the first 2 requests give the same tokens in a wave of 2 and in a wave of 4, and a
    # second engine gives the first one's batch-1 tokens
    checks = saved["checks"]
    assert checks["det_same_tokens_2_vs_4_concurrent"] is True
    assert checks["det_batch1_tokens_same_in_second_engine"] is True
    assert checks["det_every_request_got_max_new_tokens"] is True
    assert all(t["ok"] is None for t in saved["targets"])  # judged for llama8b only

    md = (out / "engine_bench.md").read_text()
    assert "## Throughput" in md and "## Batch-1 decode" in md and "det/stock" in md
    assert (out / "engine_bench.log").read_text()
    assert res["decode1"]["deterministic"]["digest"] == saved["decode1"]["deterministic"]["digest"]


def test_deterministic_outputs_equal_across_two_runs(first_run, tmp_path):
    _, first = first_run
    again = eb.run_benchmark("tiny", ["decode1", "throughput"], tmp_path, small_sizes(), seed=3, quiet=True)
    assert again["errors"] == {}, again["errors"]
    assert again["decode1"]["deterministic"]["digest"] == first["decode1"]["deterministic"]["digest"]
    for n in ("2", "4"):
        assert again["throughput"]["deterministic"][n]["digest"] == first["throughput"]["deterministic"][n]["digest"]


def test_workload_prefix_and_lengths():
    big = eb.make_workload(6, (4, 9), (2, 3), vocab=50, seed=1)
    small = eb.make_workload(3, (4, 9), (2, 3), vocab=50, seed=1)
    assert [r.prompt for r in big[:3]] == [r.prompt for r in small]
    assert all(4 <= len(r.prompt) <= 9 and 2 <= r.max_new_tokens <= 3 for r in big)
    assert all(0 <= t < 50 for r in big for t in r.prompt)
    assert len({r.seed for r in big}) == 6


def test_failing_and_over_budget_steps_are_recorded(tmp_path):
    sizes = small_sizes()
    sizes.budget_s, sizes.estimates = 1e6, {"big": 2e6}
    run = eb.Run(tmp_path, sizes, quiet=True)
    assert run.step("ok", lambda: 7) == 7
    assert run.step("boom", lambda: 1 / 0) is None
    assert run.step("big", lambda: 1) is None  # would end past the budget
    saved = json.loads((tmp_path / "engine_bench.json").read_text())
    assert "ZeroDivisionError" in saved["errors"]["boom"]
    assert "budget" in saved["skipped"]["big"]
    assert set(saved["wall_seconds"]) >= {"ok", "boom", "total"}


def test_summary_ratios_and_targets():
    res = {"model": "llama8b", "bandwidth": {"gbps": 4000.0}, "errors": {}, "skipped": {}, "wall_seconds": {},
           "model_info": {"weight_bytes": 16e9, "decode_read_bytes": 15e9},
           "decode1": {"deterministic": {"decode_tok_s": 200.0}, "stock": {"decode_tok_s": 210.0}},
           "throughput": {"deterministic": {"32": {"output_tok_s": 900.0, "output_tokens": 5, "expected_output_tokens": 5,
                                                   "request_digests": ["a"]}},
                          "stock": {"32": {"output_tok_s": 1000.0, "output_tokens": 5, "expected_output_tokens": 5,
                                           "request_digests": ["b"]}}},
           "hf": {"output_tok_s": 100.0}}
    sizes = eb.Sizes(concurrency=(32,))
    eb.summarize(res, sizes)
    assert res["decode1"]["roofline_tok_s"] == pytest.approx(250.0)
    assert res["decode1"]["det_fraction_of_roofline"] == pytest.approx(0.8)
    assert res["throughput"]["det_over_stock"]["32"] == pytest.approx(0.9)
    assert res["throughput"]["det_over_hf"]["32"] == pytest.approx(9.0)
    ok = {t["target"]: t["ok"] for t in res["targets"]}
    assert ok["batch-1 decode >= 150 tok/s (#10)"] is True
    assert ok["32 concurrent: det/stock >= 0.85 (#10)"] is True
    assert ok["32 concurrent: det/stock >= 0.92 (#13)"] is False
    assert ok["32 concurrent det vs HF generate batch 32: >= 10x (#10)"] is False  # the largest wave: judged
    md = eb.render_markdown(res, sizes)
    assert "| 32 | 900 | 1000 | 0.900 |" in md


def test_hf_target_judged_at_the_largest_wave_and_bounded_below_it():
    wave = {"output_tokens": 1000, "expected_output_tokens": 1000, "longest_output_tokens": 100}
    res = {"model": "llama8b", "errors": {}, "skipped": {}, "wall_seconds": {},
           "decode1": {"deterministic": {"decode_tok_s": 200.0, "inter_token_ms": 5.0}},
           "throughput": {"deterministic": {"32": dict(wave, output_tok_s=800.0, request_digests=["a"]),
                                            "256": dict(wave, output_tok_s=2000.0, request_digests=["a", "b"])}},
           "hf": {"output_tok_s": 100.0}}
    eb.summarize(res, eb.Sizes(concurrency=(32, 256)))
    # 1000 tokens in at least 100 steps of 5 ms: at most 2000 tok/s = 20x HF
    assert res["throughput"]["det_over_hf_bound"]["32"] == pytest.approx(20.0)
    ok = {t["target"]: t["ok"] for t in res["targets"]}
    assert ok["256 concurrent det vs HF generate batch 32: >= 10x (#10)"] is True
    info = [t for t in res["targets"] if t["target"].startswith("32 concurrent det vs HF")]
    assert len(info) == 1 and info[0]["ok"] is None and "20.0x" in info[0]["target"] and info[0]["measured"] == "8.0"


def test_cli_parts_and_defaults(monkeypatch):
    args = eb.parse_args(["--model", "tiny", "--parts", "decode1,hf", "startup"])
    assert [x for item in args.parts for x in item.split(",")] == ["decode1", "hf", "startup"]
    monkeypatch.setenv("OUT", "/some/dir")
    assert eb.default_out() == "/some/dir"
    monkeypatch.delenv("OUT")
    assert eb.default_out() == "benchmarks/out"
    with pytest.raises(ValueError):
        eb.run_benchmark("tiny", ["nope"])
    assert eb.digest([[1, 2]]) == eb.digest([[1, 2]]) != eb.digest([[2, 1]])
    tiny = eb.model_spec("tiny")
    assert tiny.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
