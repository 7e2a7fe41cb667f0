"""A server with stock kernels (``--no-deterministic``) says so in its fingerprint, and
check-server catches that it is not batch-invariant (on this CPU too): the checks can fail."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import httpx
import pytest

from detcompile.cli import main

from .conftest import API_KEY


def test_check_server_catches_stock_kernels(server, stock, capsys):
    """The same engine with stock kernels (--no-deterministic) is not batch-invariant on this CPU
    either: check-server must see it, and the fingerprint must say so."""
    info = httpx.get(stock.url + "/get_model_info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["deterministic"] is False and info["system_fingerprint"].startswith("detc-stock-")
    rc = main(["check-server", "--url", stock.url, "--mode", "single", "--n-trials", "6", "--max-new-tokens", "16",
               "--temperature", "0.8", "--api-key", API_KEY, "--quiet"])
    out = capsys.readouterr().out
    if rc == 0:  # stock kernels can be batch-invariant on some CPUs by luck; nothing to catch then
        pytest.skip("the stock kernels happened to give the same bits for every batch here")
    assert rc == 1 and "FAIL" in out, out
