"""The command line: ``detcompile demo`` and ``detcompile explain``."""
import pytest
import torch

from detcompile.cli import main
from detcompile.demo import format_demo, run_demo


def test_explain_cli_on_tiny_llama(capsys):
    torch._dynamo.reset()
    assert main(["explain", "--arch", "llama", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "detcompile.attention.default" in out and "detcompile.matmul.default" in out
    assert "batch-invariant" in out


def test_explain_cli_unknown_arch_is_clear_error(capsys):
    assert main(["explain", "--arch", "no-such-model", "--device", "cpu"]) == 2
    assert "unknown model architecture" in capsys.readouterr().err


def test_unknown_arch_suggests_close_names_not_every_name(capsys):
    assert main(["explain", "--arch", "lama", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "llama" in err and len(err) < 400, err


@pytest.mark.parametrize("cmd", ["explain", "audit"])
def test_missing_model_dir_is_a_one_line_error(cmd, capsys, tmp_path):
    assert main([cmd, "--model", "/nonexistent/checkpoint", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert main([cmd, "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_demo_deterministic_gives_one_output():
    res = run_demo(device="cpu", batch_sizes=(1, 3, 5), prompt_len=8, new_tokens=3,
                   ways=("eager", "deterministic"), progress=False)
    det = res["results"]["deterministic"]
    assert det["logits"] == 1 and det["tokens"] == 1
    # seeded sampling: the global generator gives the prompt other draws in other batches; the engine not
    assert res["sampling"]["engine"] == 1 and res["sampling"]["hf_generate"] > 1
    text = format_demo(res)
    assert "deterministic" in text and "eager" in text and "1 distinct sample(s)" in text


def test_demo_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--batch-sizes", "0,2"])
    assert main(["demo", "--ways", "eager,bogus", "--device", "cpu", "--no-progress"]) == 2
