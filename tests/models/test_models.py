"""Per-model tests on tiny random-weight configs (CPU, float32): the logits of a target row are
bitwise equal whatever the batch around it, with right padding too, and close to eager.
"""
import pytest
import torch

from detcompile.models import tiny_model

from .._subset import cpu_subset
from ._util import ALL_ARCHS, BATCHES, batch_with_target, rel_err

SEQ = 12


def _compile(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="deterministic", options={"strict": True})


# bloom: ALiBi through eager baddbmm. The default CPU run takes a dense, a MoE, a Conv1D, an encoder and the
# ALiBi model; the others are slow there (every one runs on a GPU machine and with -m slow).
@pytest.mark.parametrize("arch", cpu_subset(ALL_ARCHS + ["bloom"], keep=["llama", "mixtral", "gpt2", "bert", "bloom"]))
def test_target_row_bitwise_across_batches_and_padding(arch):
    model = tiny_model(arch)
    vocab = model.config.vocab_size
    compiled = _compile(model)
    target = torch.randint(3, vocab, (SEQ,), generator=torch.Generator().manual_seed(7))

    with torch.no_grad():
        ref = None
        for bs, seed, row in BATCHES:
            batch, row = batch_with_target(target, bs, vocab, seed, row)
            logits = compiled(batch).logits[row]
            if ref is None:
                ref = logits
            else:
                assert torch.equal(logits, ref), f"{arch}: batch of {bs} changed the target row"

        # Accuracy against eager (float32): a separate check with a tolerance.
        eager = model(target[None]).logits[0]
        assert rel_err(ref, eager) < 1e-3

        # Right padding: the target (shorter) inside a batch of longer rows, padded at the end.
        short = target[: SEQ - 4]
        alone = compiled(short[None], attention_mask=torch.ones(1, SEQ - 4, dtype=torch.long)).logits[0]
        batch, row = batch_with_target(target, 3, vocab, 11, row=2)  # the padded row last
        mask = torch.ones_like(batch)
        batch[row, SEQ - 4 :] = 0
        mask[row, SEQ - 4 :] = 0
        padded = compiled(batch, attention_mask=mask).logits[row, : SEQ - 4]
        assert torch.equal(padded, alone), f"{arch}: right padding changed the real tokens' logits"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_packed_sequences_match_each_sequence_alone(arch):
    # position_ids that restart mark packed sequences; each must get the bits it gets alone.
    model = tiny_model(arch)
    vocab = model.config.vocab_size
    compiled = _compile(model)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, vocab, (9,), generator=g)
    b = torch.randint(3, vocab, (13,), generator=g)
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(9), torch.arange(13)])[None]
    with torch.no_grad():
        out = compiled(packed, position_ids=pos, use_cache=False).logits[0]
        alone_a = compiled(a[None]).logits[0]
        alone_b = compiled(b[None]).logits[0]
    assert torch.equal(out[:9], alone_a)
    assert torch.equal(out[9:], alone_b)


def test_training_style_forward_matches_inference():
    # RL trainers recompute logprobs with gradients on; the forward bits must match the sampler's.
    model = tiny_model("llama")
    model.train(False)
    compiled = _compile(model)
    ids = torch.randint(3, 256, (3, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        inf = compiled(ids).logits
    train = compiled(ids).logits
    assert train.requires_grad
    assert torch.equal(train.detach(), inf)
    train.float().logsumexp(-1).sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
