"""Server tests: the real ``detcompile serve`` process (tiny model, CPU) on a free loopback port.

Three server processes are started once per test session: ``server`` (used by every module) and
``replica`` (same options, for the scale-out test) side by side, so they compile in parallel; then
``stock`` (``--no-deterministic``: stock kernels, which check-server must catch; no compile) while
the first tests run. All require an API key, so every request here also exercises the key check.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # every test module skips (see _deps.require), so nothing here runs
    httpx = None

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
MAX_NUM_SEQS = 8
MAX_QUEUE = 24  # capacity: 32 sequences at once
SERVE_ARGS = ["--model", "tiny", "--host", "127.0.0.1", "--port", "0", "--max-num-seqs", str(MAX_NUM_SEQS),
              "--max-queue", str(MAX_QUEUE), "--max-model-len", "512", "--kv-cache-gb", "0.0625",
              "--block-size", "4", "--chunked-prefill-size", "64"]


class ServerProcess:
    def __init__(self, name: str, extra: list[str] = ()):
        self.log_path = Path(tempfile.mkdtemp(prefix=f"detc-{name}-")) / "server.log"
        env = dict(os.environ)
        # The suite's conftest turns on the Triton interpreter for the CPU; the server process runs
        # the CPU kernels directly (much faster to start), as `detcompile serve` does on a CPU machine.
        env.pop("TRITON_INTERPRET", None)
        env.pop("DETCOMPILE_API_KEY", None)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "detcompile", "serve", *SERVE_ARGS, "--api-key", API_KEY,
                                      *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = None

    def wait(self, timeout: float = 180.0) -> "ServerProcess":
        t0 = time.time()
        while time.time() - t0 < timeout:
            text = self.log_path.read_text()
            m = re.search(r"listening on (http://\S+)", text)
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server did not start in {timeout} s:\n{self.log_path.read_text()[-3000:]}")
        while time.time() - t0 < timeout:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became healthy")

    def client(self, **kw) -> "httpx.Client":
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^detcompile_(\w+) ([0-9.eE+-]+)$", text, re.M)}

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


_PROCS: dict[str, ServerProcess] = {}


def _procs() -> dict[str, ServerProcess]:
    if not _PROCS:  # start both at once: they compile in parallel
        _PROCS["server"] = ServerProcess("server")
        _PROCS["replica"] = ServerProcess("replica")
    return _PROCS


@pytest.fixture(scope="session")
def server():
    p = _procs()["server"].wait()
    if "stock" not in _PROCS:  # starts now, is ready by the time test_stock runs (the last module)
        _PROCS["stock"] = ServerProcess("stock", ["--no-deterministic"])
    yield p


@pytest.fixture(scope="session")
def replica():
    return _procs()["replica"].wait()


@pytest.fixture(scope="session")
def stock(server):
    return _PROCS["stock"].wait()


@pytest.fixture(scope="session", autouse=True)
def _stop_servers():
    yield
    for p in _PROCS.values():
        p.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
