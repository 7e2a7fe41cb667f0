"""``detcompile check-server`` in every mode against the real server prints ``Unique samples: 1``
and exits 0; against a server whose answers vary it exits 1."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from detcompile.cli import main

from .conftest import API_KEY


@pytest.mark.parametrize("mode", ["single", "mixed", "prefix", "radix", "p_vs_d"])
def test_check_server_every_mode(server, capsys, mode):
    rc = main(["check-server", "--url", server.url, "--mode", mode, "--n-trials", "3", "--max-new-tokens", "6",
               "--temperature", "0.8", "--concurrency", "4", "--api-key", API_KEY])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(f"[{mode}]")]
    assert lines, out
    assert all(ln.endswith("Unique samples: 1") for ln in lines), out
    assert rc == 0 and "PASS" in out
    if mode == "radix":
        assert "with 0 cached prompt tokens" not in out  # the warm batches did hit the cache


class _Flaky(BaseHTTPRequestHandler):
    """A fake server whose answers depend on the batch size (what check-server must catch)."""

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"max_model_len": 256, "vocab_size": 100, "has_tokenizer": True, "system_fingerprint": "fake"})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path != "/generate":
            return self._send({"success": True})
        prompts = req.get("text") or req.get("input_ids")
        n = len(prompts)
        tok = random.Random(n).randrange(100)
        self._send([{"text": "x", "output_ids": [tok],
                     "meta_info": {"output_token_logprobs": [[-1.0 / (n + 1), tok, None]]}}] * n)


def test_check_server_fails_on_a_nondeterministic_server(capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rc = main(["check-server", "--url", f"http://127.0.0.1:{httpd.server_port}", "--mode", "single",
                   "--n-trials", "4", "--quiet"])
    finally:
        httpd.shutdown()
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out
    assert "Unique samples: 1" not in out and "[single] Prompt 1: total samples: 10, Unique samples: " in out


def test_check_server_unreachable(capsys):
    rc = main(["check-server", "--url", "http://127.0.0.1:9", "--mode", "single", "--n-trials", "1", "--timeout", "2"])
    assert rc == 2 and "cannot reach" in capsys.readouterr().out
