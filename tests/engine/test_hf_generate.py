"""``detcompile.generate`` and ``detcompile.patch_generate``: HF-style calls through the engine."""
import pytest
import torch

import detcompile
from detcompile.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_patched_generate_left_padded_rows_equal_alone(model):
    detcompile.patch_generate(model, max_num_seqs=8, block_size=4, max_model_len=128, kv_cache_bytes=8 << 20,
                              log=lambda m: None)
    rows = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [7, 7, 7, 7]]
    ids, mask = left_pad(rows, pad=0)
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=6, seed=7,
                         pad_token_id=0)
    assert out.shape[0] == 3 and torch.equal(out[:, : ids.shape[1]], ids)
    for i, r in enumerate(rows):
        alone = model.generate(torch.tensor([r]), do_sample=True, temperature=0.8, max_new_tokens=6, seed=7,
                               pad_token_id=0)
        assert torch.equal(alone[0, len(r):], out[i, ids.shape[1]:]), i
    again = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=6, seed=7,
                           pad_token_id=0)
    assert torch.equal(out, again)
    other_seed = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=6,
                                seed=8, pad_token_id=0)
    assert not torch.equal(out, other_seed)


def test_patched_generate_greedy_n_and_dict_output(model):
    detcompile.patch_generate(model, max_num_seqs=8, block_size=4, max_model_len=128, kv_cache_bytes=8 << 20,
                              log=lambda m: None)
    ids = torch.tensor([[5, 6, 7]])
    greedy = model.generate(ids, max_new_tokens=5, pad_token_id=0)
    assert greedy.shape == (1, 8)
    out = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=5, seed=1,
                         return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (3, 8) and len({tuple(r.tolist()) for r in out.sequences}) == 3
    with pytest.raises(ValueError, match="beam"):
        model.generate(ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(TypeError, match="unsupported"):
        model.generate(ids, max_new_tokens=2, not_an_argument=1)


def test_one_call_generate_reuses_its_engine(model):
    kw = dict(engine_options=dict(max_num_seqs=8, block_size=4, max_model_len=128, kv_cache_bytes=8 << 20,
                                  log=lambda m: None), use_tqdm=False)
    a = detcompile.generate(model, [[5, 6, 7], [8, 9]], seed=7, max_new_tokens=4, temperature=0.8, **kw)
    engine = model._detcompile_engine[1]
    b = detcompile.generate(model, [8, 9], seed=7, max_new_tokens=4, temperature=0.8, **kw)
    assert model._detcompile_engine[1] is engine
    assert a[1].token_ids == b[0].token_ids and len(a) == 2


def test_scores_and_logits_when_asked(model):
    detcompile.patch_generate(model, max_num_seqs=8, block_size=4, max_model_len=128, kv_cache_bytes=8 << 20,
                              log=lambda m: None)
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    out = model.generate(ids, do_sample=True, temperature=0.5, top_k=3, max_new_tokens=4, seed=2, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert len(out.scores) == len(out.logits) == out.sequences.shape[1] - 3
    with torch.no_grad():
        plain = model(out.sequences[:, :-1]).logits[:, 2:]  # stock forward: close, not bitwise
    for t, (score, logit) in enumerate(zip(out.scores, out.logits)):
        assert score.shape == logit.shape == (2, model.config.vocab_size)
        assert torch.allclose(logit, plain[:, t].float(), atol=1e-4)
        assert ((score > float("-inf")).sum(-1) <= 3).all()  # top-k = 3 left at most 3 tokens
        chosen = out.sequences[:, 3 + t]
        assert torch.isfinite(score.gather(1, chosen[:, None])).all()
        assert torch.equal(score[score > float("-inf")], (logit / 0.5)[score > float("-inf")])
