"""The architecture sweep (benchmarks/model_sweep.py) on a small fixed subset, and its classification.

The subset is architectures outside tests/models/_util.py:ALL_ARCHS that pass the sweep, each bringing
something the per-model tests do not: Gemma's GeGLU and ``1 + w`` RMSNorm, DeepSeek-V3's multi-head latent
attention with grouped top-k MoE routing, GPT-BigCode's multi-query attention, Phi's partial rotary and
parallel attention/MLP block, BART's decoder (learned positions, post-LayerNorm), MPT's ALiBi biases,
Mamba's depthwise causal conv1d and selective scan (an SSM), Qwen3-Next's gated DeltaNet layers (causal
conv1d, the chunked UT transform's triangular solves) beside full-attention layers.
About 40 s in all on a 2-core CPU.
"""
import time

import pytest
import torch
from torch import nn

from benchmarks.model_sweep import check_arch, check_model, half_precision_ok, run_one, stock_compile_explains

from .._subset import cpu_subset
from ._util import ALL_ARCHS

SUBSET = ["gemma", "deepseek_v3", "gpt_bigcode", "phi", "bart", "mpt", "mamba", "qwen3_next"]
PER_ARCH_LIMIT_S = 45


def test_subset_is_new_architectures():
    assert not set(SUBSET) & set(ALL_ARCHS)


@pytest.mark.parametrize("arch", cpu_subset(SUBSET, keep=[a for a in SUBSET if a not in ("mamba", "qwen3_next")]))
def test_sweep_check_passes(arch):
    t0 = time.time()
    res = check_arch(arch)
    assert res.status == "pass", f"{arch}: {res.status}: {res.reason}"
    assert res.rel_err is not None and res.rel_err < 1e-3
    assert time.time() - t0 < PER_ARCH_LIMIT_S, f"{arch} took {time.time() - t0:.0f} s"


class CumprodLM(nn.Module):
    """A toy LM whose float cumprod no pass rewrites: strict mode must name it."""

    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = torch.cumprod(torch.sigmoid(self.emb(ids)), dim=1)
        return self.head(x)


class PlainLM(nn.Module):
    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.norm(self.emb(ids))
        x = x + torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x
        return self.head(x)


def test_unsupported_op_is_a_strict_error_naming_it():
    torch.manual_seed(0)
    res = check_model(CumprodLM().eval(), vocab=32, name="cumprod-lm")
    assert res.status == "strict-error", res
    assert any("cumprod" in op for op in res.ops), res.ops
    assert "cumprod" in res.reason


def test_any_module_can_pass():
    torch.manual_seed(0)
    res = check_model(PlainLM().eval(), vocab=32, name="plain-lm")
    assert res.status == "pass", res


def test_eager_failure_is_not_blamed_on_compile():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, ids):
            raise RuntimeError("broken model")

    res = check_model(Broken(), vocab=32)
    assert res.status == "eager-fails" and "broken model" in res.reason


def test_subprocess_time_limit_gives_timeout():
    res = run_one("llama", "cpu", "float32", time_budget=2)
    assert res.status == "timeout", res


def test_half_precision_verdict():
    tol = 3e-2
    assert half_precision_ok(0.01, tol, 0.5, 9.0)  # close to eager: pass whatever the rest
    # Far from eager 16-bit, but eager itself is that far from float32 (doge in bf16): pass.
    assert half_precision_ok(0.56, tol, 1.41, 1.42)
    assert half_precision_ok(0.2, tol, 0.001, 0.02)  # eager exact-ish, ours within tol of float32
    # Far from both, and much farther from float32 than eager: inaccurate.
    assert not half_precision_ok(0.5, tol, 0.01, 0.5)
    assert not half_precision_ok(0.5, tol, 0.1, 0.21)


def test_resume_reruns_named_archs_and_keeps_the_rest(tmp_path, monkeypatch):
    import json

    from benchmarks import model_sweep

    out = tmp_path / "models.md"
    old = [model_sweep.Result("llama", "pass"), model_sweep.Result("doge", "inaccurate", "far")]
    first_env = dict(model_sweep.environment("cpu", "float32"), date="2000-01-01 00:00 UTC", jobs=12)
    model_sweep.write_reports(out, old, first_env, [], 1.0, 1.0)
    model_sweep.notes_path(out).write_text("## Notes\n\nhand-written")
    ran = []

    def fake_run_one(arch, *a, **k):
        ran.append(arch)
        return model_sweep.Result(arch, "pass")

    monkeypatch.setattr(model_sweep, "run_one", fake_run_one)
    model_sweep.main(["--archs", "doge", "--out", str(out), "--resume"])
    results = {r["arch"]: r["status"] for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    assert ran == ["doge"]
    assert results == {"llama": "pass", "doge": "pass"}
    # The first run's environment stays (the bulk of the table is from it); the re-run is recorded.
    env = json.loads(out.with_suffix(".json").read_text())["environment"]
    assert env["date"] == "2000-01-01 00:00 UTC" and env["jobs"] == 12
    assert [r["archs"] for r in env["reruns"]] == [["doge"]]
    md = out.read_text()
    assert "- date: 2000-01-01 00:00 UTC" in md and "): doge" in md.split("re-run on", 1)[1]
    assert md.rstrip().endswith("hand-written")  # the notes file is appended to every render
    # Without --archs, --resume runs only what the JSON lacks (here: nothing of these two).
    ran.clear()
    model_sweep.main(["--out", str(out), "--resume", "--total-budget", "0"])
    assert "llama" not in ran and "doge" not in ran


class TracedBranchLM(PlainLM):
    """Takes another branch under Dynamo (like a transformers mask that is only built when traced)."""

    def forward(self, ids):
        out = super().forward(ids)
        return out * 2 if torch.compiler.is_compiling() else out


def test_model_that_changes_under_dynamo_is_judged_against_stock_compile():
    torch.manual_seed(0)
    res = check_model(TracedBranchLM().eval(), vocab=32, name="traced-branch-lm")
    assert res.status == "pass", res
    assert "changes under Dynamo" in res.reason and "stock torch.compile" in res.reason


def test_stock_compile_verdict():
    tol = 1e-3
    assert stock_compile_explains(tol, 0.65, 1e-7)  # doge on the GPU stack: Dynamo builds the causal mask
    assert not stock_compile_explains(tol, 1e-7, 0.65)  # stock compile matches eager: ours is wrong
    assert not stock_compile_explains(tol, 0.65, 0.3)  # far from both
