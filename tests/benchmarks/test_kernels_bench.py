"""The pure parts of benchmarks/kernels/, on the CPU: arithmetic, targets, bitwise checks, the paged
cache layout, table formatting, one run of every section on tiny shapes with a fake timer (the
plumbing from records to the markdown/JSON/PNG reports), the bandwidth ceiling's byte counts with
fake timers, and what the timers put between their CUDA events (a fake clock). No real timing is
checked here: that needs the GPU."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels import attention as attention_section
from benchmarks.kernels.attention import (
    causal_attention_flops, decode_cell_fits, decode_record, decode_summary, gather_pages, kv_cache_bytes,
    make_block_table, prefill_record, prefill_summary, skipped_decode_record,
)
from benchmarks.kernels import timing as timing_module
from benchmarks.kernels.bandwidth import (
    METHODS, ceiling_markdown, copy_kernel, measure_copy_bandwidth, memcpy, read_all,
)
from benchmarks.kernels.cli import BANDWIDTH_OUT, FULL_OUT, main, parse_args, parse_sections
from benchmarks.kernels.context import Context
from benchmarks.kernels.matmul import matmul_bytes, matmul_flops, matmul_record, matmul_summary
from benchmarks.kernels.measures import gbps, geomean, row0_matches, same_bits, speed_ratio
from benchmarks.kernels.norms import norm_bytes, norm_record, norms_summary
from benchmarks.kernels.plots import pyplot
from benchmarks.kernels.report import above_ceiling, render_markdown, report_json, write_reports
from benchmarks.kernels.sections import SECTIONS, Section, run_section
from benchmarks.kernels.shapes import Grid
from benchmarks.kernels.tables import fmt, fmt_bool, fmt_pct, fmt_time, markdown_table, verdict
from benchmarks.kernels.timing import EagerTimer, GraphTimer, Timing, calls_per_graph, rotation_count


# ------------------------------------------------------------------------------------------------
# Arithmetic.
# ------------------------------------------------------------------------------------------------


def test_geomean():
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert geomean([0.5, None, 2.0]) == pytest.approx(1.0)  # None (not measured) is left out
    assert geomean([]) is None and geomean([None]) is None
    with pytest.raises(ValueError):
        geomean([1.0, 0.0])


def test_speed_ratio_is_baseline_time_over_ours():
    assert speed_ratio(ours_s=2e-3, baseline_s=1e-3) == pytest.approx(0.5)  # ours twice as slow


def test_byte_and_flop_counts():
    assert matmul_flops(2, 3, 5) == 60
    assert matmul_bytes(1, 4096, 4096) == 2 * (4096 + 4096 * 4096 + 4096)
    assert norm_bytes("softmax", 8, 100) == 2 * 2 * 8 * 100
    assert norm_bytes("rms_norm", 8, 100) == 2 * (2 * 8 * 100 + 100)  # plus the weight
    assert causal_attention_flops(1, 32, 1024, 128) == 4 * 32 * 1024 * 1024 * 128 / 2
    # the largest decode cell: 256 sequences of 32768 tokens, 8 KV heads of 128, K and V, bf16
    assert kv_cache_bytes(256, 32768, 8, 128) == 256 * 32768 * 8 * 128 * 2 * 2 == 34_359_738_368
    assert gbps(3e9, 1.5) == pytest.approx(2.0)


def test_rotation_and_calls_per_graph():
    assert rotation_count(32 * 2**20, 200 * 2**20, 64) == 7  # 7 x 32 MiB >= 200 MiB
    assert rotation_count(2**30, 200 * 2**20, 64) == 1
    assert rotation_count(16, 200 * 2**20, 64) == 64  # capped
    assert rotation_count(0, 200 * 2**20, 64) == 64
    assert calls_per_graph(est_s=1e-4, target_s=1e-2, copies=1, max_calls=1000) == 100
    assert calls_per_graph(est_s=1e-4, target_s=1e-2, copies=7, max_calls=1000) == 105  # whole rotations
    assert calls_per_graph(est_s=1e-7, target_s=1e-2, copies=1, max_calls=1000) == 1000
    assert calls_per_graph(est_s=0.05, target_s=1e-2, copies=3, max_calls=1000) == 3  # one rotation at least


# ------------------------------------------------------------------------------------------------
# Bitwise checks.
# ------------------------------------------------------------------------------------------------


def test_same_bits_is_bitwise():
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    assert same_bits(x, x.clone())
    y = x.clone()
    y.view(torch.int16)[1, 2] ^= 1  # one bf16 ulp: flip the lowest mantissa bit
    assert not same_bits(x, y)
    zero, neg_zero = torch.zeros(2), torch.tensor([0.0, -0.0])
    assert torch.equal(zero, neg_zero) and not same_bits(zero, neg_zero)  # stricter than torch.equal
    nan = torch.tensor([float("nan"), 1.0])
    assert not torch.equal(nan, nan.clone()) and same_bits(nan, nan.clone())
    assert not same_bits(x, x.float())  # dtype differs
    assert not same_bits(x, x[:2])  # shape differs


def test_row0_matches_compares_the_first_row_only():
    alone = torch.randn(1, 4, dtype=torch.float16)
    batched = torch.cat([alone, torch.randn(5, 4, dtype=torch.float16)])
    assert row0_matches(batched, alone)
    other = batched.clone()
    other[3] += 1  # other rows do not matter
    assert row0_matches(other, alone)
    other[0, 0] += 1
    assert not row0_matches(other, alone)
    # decode-shaped outputs [B, H, 1, D]
    out = torch.randn(3, 2, 1, 8)
    assert row0_matches(out, out[:1].clone()) and not row0_matches(out, out[1:2].clone())


# ------------------------------------------------------------------------------------------------
# Paged cache layout.
# ------------------------------------------------------------------------------------------------


def test_block_table_is_a_permutation_of_all_pages():
    torch.manual_seed(0)
    table = make_block_table(3, 5)
    assert table.shape == (3, 5) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(15))
    assert table.flatten().tolist() != list(range(15))  # really shuffled (seeded)


def test_gather_pages_reads_tokens_where_the_block_table_puts_them():
    torch.manual_seed(0)
    batch, heads, kv_len, dim, page = 3, 2, 10, 4, 4
    pages_per_seq = math.ceil(kv_len / page)
    contiguous = torch.randn(batch, heads, kv_len, dim)
    table = make_block_table(batch, pages_per_seq)
    cache = torch.full((batch * pages_per_seq, page, heads, dim), float("nan"))
    for b in range(batch):  # token t of sequence b -> cache[table[b, t // page], t % page]
        for t in range(kv_len):
            cache[table[b, t // page], t % page] = contiguous[b, :, t]
    gathered = gather_pages(cache, table, kv_len)
    assert gathered.is_contiguous() and torch.equal(gathered, contiguous)


def test_decode_cell_fits():
    grid = Grid(decode_max_cache_bytes=40 * 10**9, sdpa_decode_max_batch=64)
    big = kv_cache_bytes(256, 32768, 8, 128)  # 34.4 GB: under the cap
    assert decode_cell_fits(big, grid, 256, free=79 * 10**9) == ""
    assert "over 40 GB" in decode_cell_fits(41 * 10**9, grid, 256, free=None)
    assert "memory" in decode_cell_fits(big, grid, 256, free=30 * 10**9)
    # up to batch 64 a contiguous copy is made for SDPA: twice the bytes
    assert "memory" in decode_cell_fits(20 * 10**9, grid, 64, free=30 * 10**9)
    assert decode_cell_fits(20 * 10**9, grid, 128, free=30 * 10**9) == ""


# ------------------------------------------------------------------------------------------------
# Formatting and targets.
# ------------------------------------------------------------------------------------------------


def test_markdown_table_pads_and_escapes():
    table = markdown_table(["a", "long header"], [[1, "x|y"], ["wide cell", 2.5]])
    lines = table.splitlines()
    assert lines[0] == "| a         | long header |"
    assert lines[1] == "| --------- | ----------- |"
    assert lines[2] == "| 1         | x\\|y        |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])


def test_formatters():
    assert fmt(None) == "–" and fmt(1.234, ".1f") == "1.2"
    assert fmt_pct(0.856) == "86%" and fmt_pct(None) == "–"
    assert fmt_bool(True) == "yes" and fmt_bool(False) == "no" and fmt_bool(None) == "–"
    assert fmt_time(12.34e-6) == "12.3 µs" and fmt_time(2.5e-3) == "2.50 ms"
    assert verdict(True) == "PASS" and verdict(False) == "FAIL" and verdict(None) == "n/a"


def _matmul_cell(m, ratio, row0=True, copy_gbps=3000.0):
    cublas = Timing(1e-3)
    return matmul_record("o", 4096, 4096, m, Timing(1e-3 / ratio), cublas, row0, False, copy_gbps)


def test_matmul_record_derived_numbers():
    cell = _matmul_cell(16, 0.5)
    assert cell["ratio"] == pytest.approx(0.5)
    assert cell["cublas_tflops"] == pytest.approx(2 * 16 * 4096 * 4096 / 1e-3 / 1e12)
    assert cell["ours_tflops"] == pytest.approx(cell["cublas_tflops"] / 2)
    assert cell["ours_gbps"] == pytest.approx(matmul_bytes(16, 4096, 4096) / 2e-3 / 1e9)
    assert cell["ours_copy_fraction"] == pytest.approx(cell["ours_gbps"] / 3000.0)
    big = _matmul_cell(256, 1.0)
    assert big["ours_gbps"] is None and big["ours_copy_fraction"] is None  # compute-bound: no GB/s


def test_matmul_targets_geomean_and_worst_cell():
    # geomean 1.0 but one cell at 0.84: the per-cell target fails, the geomean one passes
    cells = [_matmul_cell(1, 0.84), _matmul_cell(256, 1 / 0.84), _matmul_cell(1024, 1.0)]
    s = matmul_summary(cells)
    assert s["geomean_ratio"] == pytest.approx(1.0)
    assert s["min_ratio"] == pytest.approx(0.84) and s["min_cell"] == "o M=1"
    verdicts = {t["target"]: t["pass"] for t in s["targets"]}
    assert verdicts["geomean ours/cuBLAS >= 0.95"] is True
    assert verdicts["no cell below 0.85x"] is False
    assert s["ours_row0_bitwise"] == 3 and s["cublas_row0_bitwise"] == 0
    # one non-invariant cell fails the bitwise line
    s2 = matmul_summary([_matmul_cell(1, 1.0), _matmul_cell(16, 1.0, row0=False)])
    assert [t["pass"] for t in s2["targets"] if t["target"].startswith("ours: row 0")] == [False]


def test_matmul_decode_bandwidth_target_uses_the_geomean_of_small_m():
    # M=1 moves ~33.6 MB: at 1e-3 s / ratio that is ~33.6 GB/s * ratio; pick copy bandwidth so that
    # the two decode cells sit at 80% and 90% of it (geomean ~84.9%: FAIL)
    nbytes = matmul_bytes(1, 4096, 4096)
    copy = nbytes / 1e-3 / 1e9  # cuBLAS (1e-3 s) runs at exactly copy bandwidth
    cells = [_matmul_cell(1, 0.8, copy_gbps=copy), _matmul_cell(1, 0.9, copy_gbps=copy), _matmul_cell(4096, 2.0)]
    s = matmul_summary(cells)
    assert s["decode_copy_fraction_geomean"] == pytest.approx(math.sqrt(0.8 * 0.9))
    decode_target = [t for t in s["targets"] if "copy bandwidth" in t["target"]][0]
    assert decode_target["pass"] is False and decode_target["measured"] == "85%"
    s = matmul_summary([_matmul_cell(1, 0.9, copy_gbps=copy)])
    assert [t for t in s["targets"] if "copy bandwidth" in t["target"]][0]["pass"] is True


def _norm_cell(tokens, fraction, row0=True):
    nbytes = norm_bytes("softmax", tokens, 4096)
    copy = 3000.0
    ours = Timing(nbytes / (fraction * copy * 1e9))
    return norm_record("softmax", tokens, 4096, ours, Timing(ours.seconds), row0, copy)


def test_norm_target_only_judges_large_t():
    cells = [_norm_cell(1, 0.05), _norm_cell(1024, 0.9), _norm_cell(8192, 0.86)]
    assert cells[1]["ours_copy_fraction"] == pytest.approx(0.9)
    s = norms_summary(cells)
    assert s["judged_cells"] == 2 and s["copy_fraction_min"] == pytest.approx(0.86)
    assert s["targets"][0]["pass"] is True  # T=1 at 5% does not count
    s = norms_summary(cells + [_norm_cell(1024, 0.84)])
    assert s["targets"][0]["pass"] is False and "[1024, 4096]" in s["targets"][0]["measured"]
    assert norms_summary([_norm_cell(8192, 0.9, row0=False)])["targets"][1]["pass"] is False


def test_prefill_target_is_per_cell():
    cells = [prefill_record(1, 1024, 32, 128, Timing(1.0), Timing(0.9), None, "flash"),
             prefill_record(4, 1024, 32, 128, Timing(1.0), Timing(0.7), True, "flash")]
    s = prefill_summary(cells)
    assert s["ratio_min"] == pytest.approx(0.7) and s["targets"][0]["pass"] is False
    assert s["targets"][1]["measured"] == "1/1" and s["targets"][1]["pass"] is True
    no_flash = prefill_summary([prefill_record(1, 1024, 32, 128, Timing(1.0), None, None, None)])
    assert no_flash["targets"][0]["pass"] is None


def _decode_cell(batch, fraction, row0=True):
    copy = 3000.0
    kv = kv_cache_bytes(batch, 4096, 8, 128)
    return decode_record(4096, batch, kv, Timing(kv / (fraction * copy * 1e9)), None, None,
                            row0 if batch > 1 else None, None, copy)


def test_decode_target_judges_batch_32_and_up_and_ignores_skipped_cells():
    cells = [_decode_cell(1, 0.1), _decode_cell(32, 0.81), _decode_cell(256, 0.95),
             skipped_decode_record(32768, 512, 10**11, "cache over 40 GB")]
    assert cells[1]["floor_fraction"] == pytest.approx(0.81)
    assert cells[1]["floor_s"] == pytest.approx(cells[1]["ours_s"] * 0.81)
    s = decode_summary(cells)
    assert s["judged_cells"] == 2 and s["targets"][0]["pass"] is True
    s = decode_summary(cells + [_decode_cell(64, 0.79)])
    assert s["targets"][0]["pass"] is False and "batch 64" in s["targets"][0]["measured"]
    s = decode_summary([_decode_cell(8, 0.9, row0=False)])
    assert s["targets"][0]["pass"] is None and s["targets"][1]["pass"] is False


def test_parse_sections():
    assert parse_sections(None) == list(SECTIONS)
    assert parse_sections("attention,matmul") == ["matmul", "attention"]
    assert parse_sections("bandwidth") == []  # the ceiling only
    with pytest.raises(Exception, match="unknown section"):
        parse_sections("matmul,convs")
    with pytest.raises(Exception, match="unknown section"):
        parse_sections("bandwidth,matmul")  # bandwidth is measured anyway: only alone


def test_bandwidth_only_run_does_not_write_over_the_docs_report():
    args = parse_args(["--only", "bandwidth"])
    assert args.only == [] and args.out == BANDWIDTH_OUT
    assert parse_args([]).out == FULL_OUT and parse_args(["--only", "norms"]).out == FULL_OUT
    assert parse_args(["--only", "bandwidth", "--out", "/tmp/x"]).out == "/tmp/x"


def test_cli_without_cuda_exits_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Every section end to end on tiny CPU shapes, with a fake timer.
# ------------------------------------------------------------------------------------------------

TINY = Grid(
    matmul_shapes={"tiny": (48, 32)}, matmul_ms=(1, 3), norm_widths=(64,), norm_tokens=(1, 4),
    prefill_cases=((1, 16), (2, 16)), decode_kv_lens=(10,), decode_batches=(1, 3), page_size=4,
    heads_q=4, heads_kv=2, head_dim=16, copy_bytes=1 << 12,
)


def fake_timer(fn, *args):
    fn(*args)  # the callable must run; its time does not matter here
    return Timing(1e-3)


def reference_paged_attention(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0):
    kv_len = int(kv_lens.max())
    k, v = gather_pages(k_cache, block_table, kv_len), gather_pages(v_cache, block_table, kv_len)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True).to(q.dtype)


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    return Context(torch.device("cpu"), fake_timer, copy_gbps=1000.0, show_progress=False)


def test_sections_end_to_end_on_cpu(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(attention_section, "find_paged_attention", lambda: reference_paged_attention)
    copy = measure_copy_bandwidth(fake_timer, ctx.device, TINY.copy_bytes)
    assert copy["gbps"] == pytest.approx(2 * TINY.copy_bytes / 1e-3 / 1e9)
    sections = [run_section(name, ctx, TINY) for name in SECTIONS]
    assert [s.error for s in sections] == ["", "", ""]
    matmul, norms, attention = sections

    assert [(c["shape"], c["M"]) for c in matmul.tables["cells"]] == [("tiny", 1), ("tiny", 3)]
    assert all(c["ours_row0_bitwise"] for c in matmul.tables["cells"])  # detcompile's CPU matmul is invariant
    assert len(norms.tables["cells"]) == 3 * 2
    assert all(c["row0_bitwise"] for c in norms.tables["cells"])
    assert [c["row0_bitwise"] for c in attention.tables["prefill"]] == [None, True]
    decode = attention.tables["decode"]
    assert [(c["kv_len"], c["batch"]) for c in decode] == [(10, 1), (10, 3)]
    assert decode[1]["row0_bitwise"] is True  # the reference is batch-invariant on these shapes
    assert decode[0]["equals_prefill"] is not None and decode[1]["equals_prefill"] is None

    env = {"date": "2026-01-01 00:00 UTC", "device_name": "CPU", "torch": torch.__version__, "cuda": None,
           "triton": "x", "python": "3", "commit": "abc", "command": "python -m benchmarks.kernels", "grid": "tiny",
           "timing": "fake"}
    try:
        import matplotlib  # noqa: F401

        plt = pyplot()
    except ImportError:
        plt = None
    written = write_reports(tmp_path / "k", env, copy, TINY, sections, 1.0, plt)
    md = (tmp_path / "k.md").read_text()
    for heading in ("# Kernel speed (issue #3)", "## Matmul", "## RMSNorm", "### Causal prefill",
                    "### Decode from a paged cache"):
        assert heading in md
    assert "| tiny (48, 32)" in md and "[4, 64]" in md and ("PASS" in md or "FAIL" in md)
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["copy_bandwidth"]["gbps"] == pytest.approx(copy["gbps"])
    assert len(data["sections"]["matmul"]["tables"]["cells"]) == 2
    assert data["sections"]["attention"]["summary"]["decode"]["targets"]
    if plt is not None:
        for name in SECTIONS:
            png = tmp_path / f"k_{name}.png"
            assert png in written and png.read_bytes()[:4] == b"\x89PNG"


def test_decode_is_skipped_without_paged_attention(ctx, monkeypatch):
    monkeypatch.setattr(attention_section, "find_paged_attention", lambda: None)
    section = run_section("attention", ctx, TINY)
    assert section.error == "" and "decode" not in section.tables
    assert "skipped: paged_attention not available" in section.markdown()
    assert len(section.tables["prefill"]) == 2  # the rest still runs


def test_section_error_keeps_finished_rows(ctx, monkeypatch):
    calls = []

    def flaky_timer(fn, *args):
        calls.append(fn)
        if len(calls) > 2:  # the second matmul cell fails
            raise torch.OutOfMemoryError("simulated")
        return Timing(1e-3)

    ctx.timer = flaky_timer
    section = run_section("matmul", ctx, TINY)
    assert len(section.tables["cells"]) == 1 and "OutOfMemoryError: simulated" in section.error
    assert "Section stopped by an error" in section.markdown()


# ------------------------------------------------------------------------------------------------
# GraphTimer's control flow against a fake CUDA clock (graphs, events and streams replaced).
# ------------------------------------------------------------------------------------------------


class FakeCuda:
    """A clock that eager calls advance by ``per_call_s`` and a graph replay by its captured calls."""

    def __init__(self, per_call_s: float):
        self.per_call_s, self.now, self.capturing = per_call_s, 0.0, None
        self.graph_args = []  # per captured graph: the ids of the first argument of each call
        self.log = []  # in order: ("event",), ("replay", calls), ("call",), ("capture", calls), ("sync",), ("clone",)

    def install(self, monkeypatch):
        fake = self

        class Graph:
            def __init__(self):
                self.calls = []

            def replay(self):
                fake.log.append(("replay", len(self.calls)))
                fake.now += len(self.calls) * fake.per_call_s

        class GraphContext:
            def __init__(self, graph):
                self.graph = graph

            def __enter__(self):
                fake.capturing = self.graph
                fake.graph_args.append(self.graph.calls)

            def __exit__(self, *exc):
                fake.capturing = None
                fake.log.append(("capture", len(self.graph.calls)))

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                fake.log.append(("event",))
                self.t = fake.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        class Stream:
            def wait_stream(self, other):
                pass

        class StreamContext:
            def __init__(self, stream):
                pass

            def __enter__(self):
                pass

            def __exit__(self, *exc):
                pass

        for name, value in {"CUDAGraph": Graph, "graph": GraphContext, "Event": Event, "Stream": Stream,
                            "stream": StreamContext, "current_stream": Stream,
                            "synchronize": lambda *a: fake.log.append(("sync",))}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        clone = timing_module.clone_tensors

        def logged_clone(args):
            fake.log.append(("clone",))
            return clone(args)

        monkeypatch.setattr(timing_module, "clone_tensors", logged_clone)

    def timed_regions(self) -> list[list[tuple]]:
        """What reached the GPU between each pair of events (start, end), in order."""
        marks = [i for i, entry in enumerate(self.log) if entry == ("event",)]
        assert len(marks) % 2 == 0
        return [self.log[a + 1:b] for a, b in zip(marks[::2], marks[1::2])]

    def op(self, fail_capture=False):
        def fn(x):
            if self.capturing is not None:
                if fail_capture:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
                self.capturing.calls.append(id(x))
            else:
                self.log.append(("call",))
                self.now += self.per_call_s
            return x + 1

        return fn


def test_graph_timer_rotates_inputs_and_returns_the_time_of_one_call(monkeypatch):
    fake = FakeCuda(per_call_s=1e-4)
    fake.install(monkeypatch)
    x = torch.zeros(256)  # 1 KiB in + 1 KiB out per call: 2 copies reach the 4 KiB working set
    timer = GraphTimer(target_s=1e-2, replays=5, rotate_bytes=4096)
    t = timer(fake.op(), x)
    assert t == Timing(pytest.approx(1e-4), graphed=True)
    estimate, final = fake.graph_args
    assert len(estimate) == 2 and len(final) == 100  # ~target_s of calls, whole rotations
    assert len(set(final)) == 2 and final[0] != final[1]  # alternates over the two copies
    assert id(x) in set(final)


def test_graph_timer_times_eagerly_when_capture_fails(monkeypatch):
    fake = FakeCuda(per_call_s=2e-4)
    fake.install(monkeypatch)
    timer = GraphTimer(target_s=1e-2, replays=3, rotate_bytes=1)
    with pytest.warns(UserWarning, match="capture failed"):
        t = timer(fake.op(fail_capture=True), torch.zeros(4))
    assert t == Timing(pytest.approx(2e-4), graphed=False)


def test_graph_timer_does_not_hide_other_errors(monkeypatch):
    fake = FakeCuda(1e-4)
    fake.install(monkeypatch)

    def fails_in_the_graph(x):  # warm-up passes; an error in the graph that is not about capture
        if fake.capturing is not None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return x

    with pytest.raises(RuntimeError, match="illegal memory access"):
        GraphTimer(rotate_bytes=1)(fails_in_the_graph, torch.zeros(4))


def test_graph_timer_times_the_replays_and_nothing_else(monkeypatch):
    # Between the two events of a timed replay there is one replay of the graph of the measured calls:
    # no flush, memset, clone, warm-up call or host sync, which small kernels would be charged for.
    fake = FakeCuda(per_call_s=1e-4)
    fake.install(monkeypatch)
    t = GraphTimer(target_s=1e-2, replays=5, rotate_bytes=4096)(fake.op(), torch.zeros(256))
    assert fake.timed_regions() == [[("replay", 2)]] * 2 + [[("replay", 100)]] * 5  # estimate, then timed
    first_event = fake.log.index(("event",))
    assert ("clone",) in fake.log[:first_event] and ("call",) in fake.log[:first_event]  # set-up before
    assert ("call",) not in fake.log[first_event:]  # eager calls only in the warm-up
    assert t.seconds == pytest.approx(1e-4)  # region time / calls in the graph


def test_eager_timer_times_back_to_back_calls_only(monkeypatch):
    fake = FakeCuda(per_call_s=5e-4)
    fake.install(monkeypatch)
    t = EagerTimer(target_s=1e-2, replays=3)(fake.op(), torch.zeros(4))
    assert t == Timing(pytest.approx(5e-4), graphed=False)
    # warm-up and sync first; then the estimate (one call, twice), then 3 x 20 calls back to back
    assert fake.log[:2] == [("call",), ("sync",)]
    assert fake.timed_regions() == [[("call",)]] * 2 + [[("call",)] * 20] * 3


# ------------------------------------------------------------------------------------------------
# The bandwidth ceiling: bytes per method, the best figure, consistency with the sections' bytes.
# ------------------------------------------------------------------------------------------------


def test_bandwidth_operations_do_what_they_count():
    src = torch.randn(64, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    assert memcpy(src, dst) is dst and same_bits(dst, src)  # one read of src, one write of dst
    assert copy_kernel(src, dst) is dst and same_bits(dst, -src)
    assert read_all(src).numel() == 1  # reads src, writes one value
    by_name = {m.name: m for m in METHODS}
    assert by_name["memcpy"].bytes_moved(1000) == by_name["copy_kernel"].bytes_moved(1000) == 2000
    assert by_name["read"].bytes_moved(1000) == 1000
    assert by_name["read"].args(src, dst) == (src,) and by_name["memcpy"].args(src, dst) == (src, dst)


def _timer_by_fn(seconds: dict, calls: list):
    def timer(fn, *args):
        fn(*args)
        calls.append((fn, args))
        return Timing(seconds[fn.__name__], graphed=True)
    return timer


def test_bandwidth_ceiling_is_the_best_figure_with_each_methods_bytes():
    n = 1 << 12
    calls = []
    # the graphed memcpy is slow (as the driver's memcpy node was on the H100/H200); the copy kernel is not
    graph = _timer_by_fn({"memcpy": 2e-3, "copy_kernel": 1e-3, "read_all": 0.55e-3}, calls)
    eager = _timer_by_fn({"memcpy": 1.1e-3, "copy_kernel": 1.05e-3, "read_all": 0.6e-3}, calls)
    rec = measure_copy_bandwidth(graph, torch.device("cpu"), n, eager_timer=eager)
    got = {(m["method"], m["timer"]): m for m in rec["measurements"]}
    assert set(got) == {(m, t) for m in ("memcpy", "copy_kernel", "read") for t in ("graph", "eager")}
    assert got["memcpy", "graph"]["gbps"] == pytest.approx(2 * n / 2e-3 / 1e9)  # read + write
    assert got["copy_kernel", "eager"]["gbps"] == pytest.approx(2 * n / 1.05e-3 / 1e9)
    assert got["read", "graph"]["gbps"] == pytest.approx(n / 0.55e-3 / 1e9)  # read only
    assert got["read", "graph"]["bytes_moved"] == n
    assert rec["gbps"] == pytest.approx(2 * n / 1e-3 / 1e9)  # best: the graphed copy kernel
    assert (rec["method"], rec["timer"], rec["bytes"]) == ("copy_kernel", "graph", n)
    assert rec["seconds"] == pytest.approx(1e-3) and rec["bytes_moved"] == 2 * n
    assert rec["copy_gbps"] == rec["gbps"] and rec["read_gbps"] == pytest.approx(n / 0.55e-3 / 1e9)
    # the buffer is n bytes of bf16, and each timer got the same buffers
    srcs = {id(args[0]) for _, args in calls}
    assert len(srcs) == 1 and all(args[0].numel() * args[0].element_size() == n for _, args in calls)
    # reads faster than half a copy's time: the read-only figure is the ceiling
    faster_read = _timer_by_fn({"memcpy": 2e-3, "copy_kernel": 1e-3, "read_all": 0.45e-3}, [])
    rec = measure_copy_bandwidth(faster_read, torch.device("cpu"), n)
    assert (rec["method"], rec["timer"]) == ("read", "graph")
    assert rec["gbps"] == pytest.approx(n / 0.45e-3 / 1e9) and rec["copy_gbps"] == pytest.approx(2 * n / 1e-3 / 1e9)
    assert {m["timer"] for m in rec["measurements"]} == {"graph"}  # no eager timer on the CPU by default


def test_bandwidth_keeps_a_failed_measurement_and_needs_one_that_worked():
    def flaky(fn, *args):
        if fn is memcpy:
            raise torch.OutOfMemoryError("simulated")
        return Timing(1e-3)

    rec = measure_copy_bandwidth(flaky, torch.device("cpu"), 1 << 12)
    failed = [m for m in rec["measurements"] if m["gbps"] is None]
    assert [m["method"] for m in failed] == ["memcpy"] and "simulated" in failed[0]["error"]
    assert rec["method"] == "copy_kernel"
    assert "simulated" in ceiling_markdown(rec)

    def broken(fn, *args):
        raise RuntimeError("no GPU")

    with pytest.raises(RuntimeError, match="no bandwidth measurement succeeded"):
        measure_copy_bandwidth(broken, torch.device("cpu"), 1 << 12)


def test_fractions_of_the_ceiling_count_bytes_like_the_ceiling():
    # A kernel that moves as many bytes as the ceiling's copy in the same time is at 100%: the
    # sections count read + write bytes (norms, matmul) or read bytes (decode) as the ceiling does.
    n = 1 << 12
    rec = measure_copy_bandwidth(lambda fn, *a: Timing(1e-3), torch.device("cpu"), n)
    ceiling = rec["gbps"]
    assert ceiling == pytest.approx(2 * n / 1e-3 / 1e9)  # the copy (2n bytes) beats the read (n bytes)
    tokens, width = 4, n // 8  # softmax moves 2 bytes x (read + write) x tokens x width = 2n
    assert norm_bytes("softmax", tokens, width) == 2 * n
    cell = norm_record("softmax", tokens, width, Timing(1e-3), Timing(2e-3), True, ceiling)
    assert cell["ours_copy_fraction"] == pytest.approx(1.0) and cell["torch_copy_fraction"] == pytest.approx(0.5)
    kv = kv_cache_bytes(1, 2 * n // (2 * 2 * 2 * 16), 2, 16)  # KV bytes read = 2n
    assert kv == 2 * n
    dec = decode_record(4, 1, kv, Timing(1e-3), None, None, None, None, ceiling)
    assert dec["floor_fraction"] == pytest.approx(1.0) and dec["floor_s"] == pytest.approx(1e-3)


def _report_env():
    return {"date": "2026-01-01 00:00 UTC", "device_name": "CPU", "torch": torch.__version__, "cuda": None,
            "triton": "x", "python": "3", "commit": "abc", "command": "python -m benchmarks.kernels", "grid": "tiny",
            "timing": "fake"}


def test_report_shows_the_ceiling_measurements_and_flags_figures_above_it():
    n = 1 << 12
    rec = measure_copy_bandwidth(lambda fn, *a: Timing(1e-3), torch.device("cpu"), n)
    norms = Section("norms")
    norms.tables["cells"] = [_norm_cell(1024, 0.9), _norm_cell(8192, 1.39)]
    md = render_markdown(_report_env(), rec, [norms], {}, 1.0)
    assert f"bandwidth ceiling: **{rec['gbps']:.0f} GB/s** (memcpy, graph timer" in md
    assert "`torch.neg(src, out=dst)`" in md and "`torch.sum(src)`" in md
    assert "2 figure(s) above 105% of the ceiling" in md and "ours_copy_fraction = 139%" in md
    assert above_ceiling([norms]) == ["norms ours_copy_fraction = 139%", "norms torch_copy_fraction = 139%"]
    assert report_json(_report_env(), rec, TINY, [norms], 1.0)["above_ceiling"] == above_ceiling([norms])
    norms.tables["cells"] = [_norm_cell(1024, 1.04)]  # within the run-to-run spread
    assert above_ceiling([norms]) == [] and "above 105%" not in render_markdown(_report_env(), rec, [norms], {}, 1.0)
    # an old record (before the ceiling had several measurements) still renders
    old = {"bytes": n, "seconds": 1e-3, "gbps": 2431.0, "graphed": True}
    assert "**2431 GB/s** (memcpy, graph timer" in render_markdown(_report_env(), old, [], {}, 1.0)


def test_cli_bandwidth_only_writes_the_ceiling_and_no_section(monkeypatch, tmp_path, capsys):
    from benchmarks.kernels import cli

    class FakeGraphTimer:
        def __init__(self, target_s, replays):
            self.target_s, self.replays, self.max_calls, self.rotate_bytes = target_s, replays, 1000, 4 << 20

    def fake_measure(timer, device, nbytes):
        assert device.type == "cuda" and nbytes == 1 << 30  # the real grid's buffer
        return measure_copy_bandwidth(lambda fn, *a: Timing(1e-6), torch.device("cpu"), 1 << 12)  # 8.2 GB/s

    monkeypatch.setattr(cli, "cuda_missing", lambda prog: False)
    monkeypatch.setattr(cli, "GraphTimer", FakeGraphTimer)
    monkeypatch.setattr(cli, "measure_copy_bandwidth", fake_measure)
    monkeypatch.setattr(cli, "environment", lambda device, argv, grid, timing: _report_env())
    monkeypatch.setattr(cli, "pyplot", lambda: None)
    monkeypatch.setattr(cli, "run_section", lambda *a: pytest.fail("no section runs with --only bandwidth"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cli.main(["--only", "bandwidth", "--out", str(tmp_path / "bw")]) == 0
    out = capsys.readouterr().out
    assert "bandwidth ceiling: 8 GB/s (memcpy, graph" in out and "copy_kernel" in out and "read" in out
    data = json.loads((tmp_path / "bw.json").read_text())
    assert data["sections"] == {} and len(data["copy_bandwidth"]["measurements"]) == 3
    assert "bandwidth ceiling: **8 GB/s**" in (tmp_path / "bw.md").read_text()
