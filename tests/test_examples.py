"""The examples run as a user would run them (a fresh interpreter, CPU, nothing downloaded)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.slow  # ~15 s in a fresh interpreter; tests/test_audit.py and tests/models cover the same paths
def test_check_invariance_example():
    res = _run("check_invariance.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deterministic backend bitwise equal across batch sizes 1, 3, 8, 17: True" in res.stdout, res.stdout


@pytest.mark.slow  # ~15 s in a fresh interpreter; tests/test_audit.py and tests/models cover the same paths
def test_audit_stock_model_example():
    res = _run("audit_stock_model.py")
    assert res.returncode == 0, res.stderr[-3000:]
    stock, rewritten = res.stdout.split("== after detcompile's passes ==")
    assert "FIRST DIVERGENT NODE" in stock and "aten.mm.default" in stock, res.stdout
    assert "no divergent node" in rewritten, res.stdout


def test_engine_generate_example():
    res = _run("engine_generate.py")
    assert res.returncode == 0, res.stderr[-3000:]
    for line in ("alone == in a batch of 4: True", "same seed again: True | seed 8 differs: True",
                 "score(prompt, sample) == sampler logprobs, bit for bit: True"):
        assert line in res.stdout, res.stdout


def test_server_example_answers_generate():
    import socket
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", PORT=str(port))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "examples", "server.py")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        body = {"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        a = httpx.post(url + "/generate", json=body, timeout=60).json()
        b = httpx.post(url + "/generate", json=body, timeout=60).json()
        assert a["meta_info"]["completion_tokens"] == 8 and a["output_ids"] == b["output_ids"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith(".py")))
def test_every_example_is_tested(script):
    assert script in {"check_invariance.py", "audit_stock_model.py", "engine_generate.py", "server.py"}, f"add a test for examples/{script}"
