"""The per-model tests on the GPU in bf16 (Triton kernels, Inductor on): run with the device tool."""
import pytest
import torch

from detcompile.models import tiny_model

from ._util import ALL_ARCHS, BATCHES, batch_with_target, rel_err

pytestmark = pytest.mark.gpu
SEQ = 12


def _inductor_case(arch):
    if arch == "gpt2":  # known and recorded, not yet fixed: say so instead of failing red
        return pytest.param(arch, True, marks=pytest.mark.xfail(
            strict=False, reason="docs/inductor.md: gpt2's target row changes between the static batch-1 "
            "compile and the dynamic-shape recompile under Inductor (suspect: the gelu_new chain)"))
    if arch == "opt":  # H200, 2026-12-02: the target row moved off row 0 and opt's row changed at batch 3
        return pytest.param(arch, True, marks=pytest.mark.xfail(
            strict=False, reason="Inductor mode is not proven batch-invariant (docs/inductor.md): opt's middle "
            "row changed at batch 3 on the H200 once the target row stopped being row 0"))
    return pytest.param(arch, True)


@pytest.mark.parametrize(
    "arch,inductor",
    [pytest.param(a, False) for a in ALL_ARCHS] + [_inductor_case(a) for a in ALL_ARCHS],
    ids=[f"{a}-fx" for a in ALL_ARCHS] + [f"{a}-inductor" for a in ALL_ARCHS],
)
def test_bf16_target_row_bitwise_across_batches_and_padding(arch, inductor):
    model = tiny_model(arch, dtype=torch.bfloat16, device="cuda")
    vocab = model.config.vocab_size
    torch._dynamo.reset()
    # strict refuses Inductor until it is proven (docs/inductor.md): the Inductor cases run without it
    compiled = torch.compile(model, backend="deterministic", options={"strict": not inductor, "inductor": inductor})
    target = torch.randint(3, vocab, (SEQ,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = None
        for bs, seed, row in BATCHES:
            batch, row = batch_with_target(target, bs, vocab, seed, row)
            logits = compiled(batch.cuda()).logits[row]
            if ref is None:
                ref = logits
            else:
                assert torch.equal(logits, ref), f"{arch}: batch of {bs} changed the target row"
        eager = model(target[None].cuda()).logits[0]
        assert rel_err(ref, eager) < 3e-2  # bf16 through 2 layers: rounding, not a different function

        short = target[: SEQ - 4]
        alone = compiled(short[None].cuda(), attention_mask=torch.ones(1, SEQ - 4, dtype=torch.long, device="cuda")).logits[0]
        batch, row = batch_with_target(target, 3, vocab, 11, row=2)  # the padded row last
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
