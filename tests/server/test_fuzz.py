"""A schema fuzz of /openapi.json (schemathesis, in the test extra; skipped where it is not installed): no
request the schema allows, or nearly allows, gets a 5xx."""
from __future__ import annotations

import os

from ._deps import require

require()

import pytest  # noqa: E402

schemathesis = pytest.importorskip("schemathesis", reason="the schema fuzz needs schemathesis (pip install schemathesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from .conftest import API_KEY  # noqa: E402

MAX_TOKENS = 4  # generated lengths are capped so the fuzz stays fast; their range checks are in test_errors


def _cap(body):
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        sps = body.get("sampling_params")
        for sp in sps if isinstance(sps, list) else [sps]:
            if isinstance(sp, dict) and isinstance(sp.get("max_new_tokens"), int) and sp["max_new_tokens"] > MAX_TOKENS:
                sp["max_new_tokens"] = MAX_TOKENS
        for key in ("n",):
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzz_no_5xx(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/flush_cache":
            continue
        strategy = op.as_strategy(generation_mode=getattr(schemathesis.GenerationMode, mode.upper()))

        @settings(max_examples=int(os.environ.get("DETC_FUZZ_EXAMPLES", "10")), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            _cap(case.body)
            resp = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            if resp.status_code >= 500:
                failures.append((op.method, op.path, case.body, resp.status_code, resp.text[:300]))

        try:
            run()
        except Unsatisfiable:  # nothing to break in an operation without inputs (negative mode)
            pass
    assert not failures, failures[:5]
