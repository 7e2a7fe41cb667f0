"""Variant sweeps (issue #11 point 5): tiny models at wider hidden sizes and in other dtypes.

The tiny default (width 64) never reached the large-tile matmul launch configurations that crashed ctrl,
xlnet and trocr on the GPU; ``tiny_causal_lm(width=W)`` builds every architecture at hidden size W, and
``benchmarks/model_sweep.py --widths --dtypes`` reports each (architecture, width, dtype) on its own row.
"""
import json

import pytest
import torch

from benchmarks import model_sweep
from detcompile.models import BASE_WIDTH, WIDTH_EXTRA, tiny_causal_lm, tiny_config, width_sizes

#: Original-recipe archs (TINY/EXTRA), generic ones, MLA/MoE, and every WIDTH_EXTRA entry.
BASE_ARCHS = ["llama", "gpt2", "opt", "gemma2", "mixtral", "bloom", "ctrl", "xlnet", "trocr", "glm4_moe_lite",
              "deepseek_v3", *WIDTH_EXTRA]


@pytest.mark.parametrize("arch", BASE_ARCHS)
def test_base_width_is_the_default_tiny_config(arch):
    # The plain sweep and --widths 64 must test the same model.
    assert tiny_config(arch, width=BASE_WIDTH).to_dict() == tiny_config(arch).to_dict()


# (arch, hidden key, heads key, head-dim key or None, ffn key or None): the names each config uses.
SIZE_KEYS = [
    ("llama", "hidden_size", "num_attention_heads", "head_dim", "intermediate_size"),
    ("gpt2", "n_embd", "n_head", None, "n_inner"),
    ("ctrl", "n_embd", "n_head", None, None),  # its dff is not shrunk at any width (8192, as in the plain sweep)
    ("xlnet", "d_model", "n_head", "d_head", "d_inner"),
    ("trocr", "d_model", "decoder_attention_heads", None, "decoder_ffn_dim"),
    ("glm4_moe_lite", "hidden_size", "num_attention_heads", None, "intermediate_size"),
]


@pytest.mark.parametrize("width", [256, 1024])
@pytest.mark.parametrize("arch,hidden,heads,head_dim,ffn", SIZE_KEYS)
def test_width_sets_the_sizes(arch, hidden, heads, head_dim, ffn, width):
    cfg = tiny_config(arch, width=width)
    want = width_sizes(width)
    assert getattr(cfg, hidden) == width
    assert getattr(cfg, heads) == want["heads"]
    if head_dim is not None:
        assert getattr(cfg, head_dim) * getattr(cfg, heads) == width
    if ffn is not None:
        assert getattr(cfg, ffn) == 2 * width
    # The vocabulary grows with the width (the LM head's N picks the large GPU tiles); layers stay tiny.
    assert cfg.get_text_config().vocab_size == want["vocab"] == (4096 if width == 256 else 65536)


@pytest.mark.parametrize("arch", ["ctrl", "xlnet", "trocr", "glm4_moe_lite"])
def test_wide_models_run_eager(arch):
    model = tiny_causal_lm(arch, width=1024)
    emb = model.get_input_embeddings()
    assert emb.weight.shape[-1] == 1024
    with torch.no_grad():
        logits = model(torch.randint(3, 200, (2, 8))).logits
    assert logits.shape == (2, 8, 65536) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", sorted(WIDTH_EXTRA))
def test_width_tied_extras_build_at_256(arch):
    # Their per-architecture sizes (zamba's attention width, mamba2's heads...) follow the width.
    model = tiny_causal_lm(arch, width=256)
    with torch.no_grad():
        out = model(torch.randint(3, 200, (1, 8)))
    assert torch.isfinite(model_sweep._logits(out)).all()


def test_widths_reach_the_large_gpu_matmul_tiles():
    # What --widths is for: at the sweep's 96-row batch, the LM head selects the deep-pipeline tiles
    # (the 16-bit configs whose shared memory once overflowed), which width 64 never reached.
    from detcompile.kernels.matmul import select_config

    def head_tile(width):
        cfg = select_config(8 * model_sweep.SEQ, width_sizes(width)["vocab"], torch.bfloat16, num_sms=132)
        return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"]

    assert head_tile(64) == (64, 128, 6)
    assert head_tile(512) == (128, 128, 6)
    assert head_tile(1024) == (128, 256, 3)


def test_width_must_split_into_heads():
    assert width_sizes(64) == {"hidden": 64, "ffn": 128, "half": 32, "heads": 4, "head_dim": 16, "vocab": 256}
    assert width_sizes(1024)["heads"] * width_sizes(1024)["head_dim"] == 1024
    with pytest.raises(ValueError, match="multiple of 64"):
        width_sizes(100)
    with pytest.raises(ValueError, match="heads"):
        width_sizes(13 * 64)  # 12 heads do not divide 832


def test_check_arch_builds_at_the_width(monkeypatch):
    import detcompile.models

    seen = {}

    def fake_build(arch, dtype, device, width=None):
        seen.update(arch=arch, dtype=dtype, width=width)
        raise RuntimeError("stop here")

    monkeypatch.setattr(detcompile.models, "tiny_causal_lm", fake_build)
    res = model_sweep.check_arch("ctrl", dtype=torch.float16, width=512)
    assert seen == {"arch": "ctrl", "dtype": torch.float16, "width": 512}
    assert res.status == "eager-fails" and "stop here" in res.reason


def test_variant_sweep_reports_every_case_with_the_error_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "variants.md"
    ran = []

    def fake_run_one(arch, device, dtype, time_budget, threads=None, width=None, log_dir=None):
        ran.append((arch, width, dtype))
        if (arch, width, dtype) == ("ctrl", 1024, "float32"):
            return model_sweep.Result(arch, "compile-error", "OutOfResources: out of resource: shared memory, "
                                      "Required: 262144, Hardware limit: 232448")
        return model_sweep.Result(arch, "pass", rel_err=0.0)

    monkeypatch.setattr(model_sweep, "run_one", fake_run_one)
    model_sweep.main(["--archs", "ctrl,trocr", "--widths", "64,1024", "--dtypes", "bfloat16,float32",
                      "--out", str(out)])
    assert sorted(ran) == sorted((a, w, d) for a in ("ctrl", "trocr") for w in (64, 1024)
                                 for d in ("bfloat16", "float32"))
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["arch"], r["width"], r["dtype"]): r["status"] for r in data["results"]}
    assert len(rows) == 8 and rows[("ctrl", 1024, "float32")] == "compile-error"
    assert sum(s == "pass" for s in rows.values()) == 7
    assert data["environment"]["widths"] == [64, 1024]
    md = out.read_text()
    assert "| architecture | width | dtype | status |" in md
    assert "| ctrl | 1024 | float32 | compile-error | OutOfResources: out of resource: shared memory" in md
    assert "  - width 1024, float32: pass 1, compile-error 1" in md
    printed = capsys.readouterr().out + capsys.readouterr().err
    assert "compile-error ctrl@1024/float32: OutOfResources" in printed


def test_plain_sweep_json_keeps_its_format(tmp_path, monkeypatch):
    out = tmp_path / "models.md"
    monkeypatch.setattr(model_sweep, "run_one", lambda arch, *a, **k: model_sweep.Result(arch, "pass"))
    model_sweep.main(["--archs", "llama", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert "widths" not in data["environment"]
    assert set(data["results"][0]) == {f.name for f in model_sweep.dataclasses.fields(model_sweep.Result)} - {
        "width", "dtype", "trace"}
    assert "| architecture | status | reason | time (s) |" in out.read_text()
    # A variant sweep must not resume (and so rewrite) a plain sweep's table.
    with pytest.raises(SystemExit):
        model_sweep.main(["--archs", "llama", "--widths", "256", "--out", str(out), "--resume"])


def test_variant_case_runs_in_its_own_worker(tmp_path):
    # The real subprocess path: the case's label, width and dtype survive a timeout, and its log is kept.
    out = tmp_path / "v.md"
    model_sweep.main(["--archs", "llama", "--widths", "128", "--dtypes", "float16", "--time-budget", "1",
                      "--out", str(out), "--logs", str(tmp_path / "logs")])
    (r,) = json.loads(out.with_suffix(".json").read_text())["results"]
    assert (r["arch"], r["width"], r["dtype"], r["status"]) == ("llama", 128, "float16", "timeout")
    assert (tmp_path / "logs" / "llama@128_float16.log").exists()


def test_strict_error_names_graph_breaks():
    from detcompile.backend import strict_error

    e = strict_error("detcompile (strict): 2 op(s) cannot be made batch-invariant:\n"
                     "  - graph break: Dynamo stopped the graph here (x): the call runs eagerly\n"
                     "      at m.py:3 in f: y\n"
                     "  - aten.cumprod.default: no pass rewrites it")
    status, reason, ops, _ = model_sweep.classify_compile_exception(e)
    assert status == "strict-error" and ops == ["graph break", "aten.cumprod.default"]
    assert reason.startswith("graph break (Dynamo stopped the graph here (x)")


def test_diagnose_prints_the_whole_chain_and_the_failing_batch():
    # benchmarks/diagnose_compile.py is the GPU follow-up of a one-line sweep failure: it must say at which
    # batch size (3: the dynamic-shape recompile) the compile failed, and print every exception of the chain.
    from benchmarks.diagnose_compile import describe, run_backend

    class FailsWhenDynamic(torch.nn.Module):
        def forward(self, ids):
            if ids.shape[0] == 3:
                raise RuntimeError("inner cause")
            return ids.float() * 2

    logged = []
    verdict = run_backend(FailsWhenDynamic(), lambda bs: torch.ones(bs, 4, dtype=torch.long), "eager", logged.append)
    assert verdict.startswith("batch 3: ")
    assert any("inner cause" in line for line in logged)
    try:
        try:
            raise ValueError("root")
        except ValueError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        chain = describe(e)
    assert "RuntimeError: wrapper" in chain and "ValueError: root" in chain
