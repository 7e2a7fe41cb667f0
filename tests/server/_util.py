"""Helpers of the server tests."""
from __future__ import annotations

import json


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream's ``data:`` lines, up to ``data: [DONE]`` (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data:"):
            assert line.strip() == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return events
        events.append(json.loads(payload))
    raise AssertionError("the stream ended without data: [DONE]")


def result_key(r: dict):
    """What must be bitwise reproducible in a /generate result."""
    m = r["meta_info"]
    return (r["text"], tuple(r["output_ids"]), json.dumps(m.get("output_token_logprobs")),
            json.dumps(m.get("output_top_logprobs")), json.dumps(m["finish_reason"]))
