"""The ``openai`` package as the client of /v1: completions and chat, streaming and not, seeds."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import pytest

openai = pytest.importorskip("openai")

from .conftest import API_KEY  # noqa: E402

MODEL = "detcompile-tiny"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_completion_seeded_and_reproducible(oai, server):
    kw = dict(model=MODEL, prompt="The old lighthouse", max_tokens=10, temperature=0.9, seed=11, logprobs=2)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw)
    c = oai.completions.create(**{**kw, "seed": 12})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs
    assert a.choices[0].logprobs.token_logprobs != c.choices[0].logprobs.token_logprobs
    assert len(a.choices[0].logprobs.tokens) == 10 and len(a.choices[0].logprobs.top_logprobs[0]) == 2
    assert a.usage.completion_tokens == 10 and a.usage.prompt_tokens == len("The old lighthouse") + 1
    assert a.system_fingerprint == c.system_fingerprint and a.system_fingerprint.startswith("detc-det-")
    assert a.choices[0].finish_reason == "length"


def test_completion_n_and_token_prompts(oai):
    r = oai.completions.create(model=MODEL, prompt=[[1, 40, 41], [1, 50]], max_tokens=6, n=2, seed=5,
                               temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    one = oai.completions.create(model=MODEL, prompt=[1, 50], max_tokens=6, n=2, seed=5, temperature=1.0)
    assert [c.text for c in r.choices[2:]] == [c.text for c in one.choices]


def test_completion_stream_equals_plain(oai):
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0.7, seed=3, logprobs=0)
    plain = oai.completions.create(**kw)
    chunks = list(oai.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert text == plain.choices[0].text
    assert lps == plain.choices[0].logprobs.token_logprobs
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_stop_string_streamed(oai):
    free = oai.completions.create(model=MODEL, prompt="abc", max_tokens=30, temperature=0.0)
    text = free.choices[0].text
    visible = [ch for ch in text if ch.strip()]
    if not visible:
        pytest.skip("the tiny model produced no visible text to stop on")
    stop = visible[len(visible) // 2]
    kw = dict(model=MODEL, prompt="abc", max_tokens=30, temperature=0.0, stop=[stop])
    plain = oai.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(**kw, stream=True) if c.choices)
    assert plain.choices[0].text == streamed == text[:text.index(stop)]
    assert plain.choices[0].finish_reason == "stop"


def test_chat_seeded_stream_and_logprobs(oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=0.8, seed=21)
    plain = oai.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    again = oai.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    assert plain.choices[0].message.content == again.choices[0].message.content
    assert [t.logprob for t in plain.choices[0].logprobs.content] == [t.logprob for t in again.choices[0].logprobs.content]
    assert len(plain.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in plain.choices[0].logprobs.content)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    other = oai.chat.completions.create(**{**kw, "seed": 22}, logprobs=True)
    assert [t.logprob for t in other.choices[0].logprobs.content] != [t.logprob for t in plain.choices[0].logprobs.content]


def test_openai_errors(oai):
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        oai.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="n "):
        oai.completions.create(model=MODEL, prompt="x", n=1000)
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model=MODEL, messages=[])
    bad = openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
