"""The per-model tests on the GPU in bf16 (Triton kernels, Inductor on): run with the device tool."""
import pytest
import torch

from detcompile.models import tiny_model

from ._util import ALL_ARCHS, batch_with_target, rel_err

pytestmark = pytest.mark.gpu
SEQ = 12


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("inductor", [False, True], ids=["fx", "inductor"])
def test_bf16_target_row_bitwise_across_batches_and_padding(arch, inductor):
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    vocab = model.config.vocab_size
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic", options={"strict": True, "inductor": inductor})
    target = torch.randint(3, vocab, (SEQ,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = None
        for bs, seed in ((1, 0), (3, 1), (8, 2), (3, 3)):
            batch, row = batch_with_target(target, bs, vocab, seed)
            logits = compiled(batch.cuda()).logits[row]
            if ref is None:
                ref = logits
            else:
                assert torch.equal(logits, ref), f"{arch}: batch of {bs} changed the target row"
        eager = model(target[None].cuda()).logits[0]
        assert rel_err(ref, eager) < 3e-2  # bf16 through 2 layers: rounding, not a different function

        short = target[: SEQ - 4]
        alone = compiled(short[None].cuda(), attention_mask=torch.ones(1, SEQ - 4, dtype=torch.long, device="cuda")).logits[0]
        batch, row = batch_with_target(target, 3, vocab, 11)
        mask = torch.ones_like(batch)
        batch[row, SEQ - 4 :] = 0
        mask[row, SEQ - 4 :] = 0
        padded = compiled(batch.cuda(), attention_mask=mask.cuda()).logits[row, : SEQ - 4]
        assert torch.equal(padded, alone), f"{arch}: right padding changed the real tokens' logits"


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt2"])
def test_fp32_gpu_close_to_eager(arch):
    model = tiny_model(arch, dtype=torch.float32, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic", options={"strict": True})
    ids = torch.randint(3, model.config.vocab_size, (3, SEQ), device="cuda")
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, model(ids).logits) < 1e-3
