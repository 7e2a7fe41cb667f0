"""detcompile.kernels.gumbel_argmax: the sampler's fused noise + mask + argmax against its torch
definition (interpreter on the CPU, the real kernel on the GPU)."""
import pytest
import torch

from detcompile.kernels.gumbel_argmax import cut_mask, gumbel_argmax, reference_gumbel_argmax

from ._util import needs_triton


def rows(B, V, gen, device="cpu"):
    z = torch.randn(B, V, generator=gen)
    temp = torch.tensor([0.0, 0.8, 1.0, 0.5, 2.0] * B)[:B]
    seed = torch.randint(0, 2**62, (B,), generator=gen)
    pos = torch.randint(0, 10**6, (B,), generator=gen)
    z[:, 10:20] = z[:, 9:10]  # equal values: the cut's index decides among them
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    last = torch.randint(0, V, (B, 1), generator=gen)
    last[0] = (order[0] == 15).nonzero()[0]  # row 0 cuts inside the run of equal values
    cut = (z.gather(1, order.gather(1, last))[:, 0], order.gather(1, last)[:, 0])
    return [t.to(device) for t in (z, temp, seed, pos)] + [tuple(c.to(device) for c in cut)]


def test_cut_mask_is_a_sorted_prefix(gen):
    z, _, _, _, cut = rows(3, 300, gen)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    mask = cut_mask(z, cut)
    for b in range(3):
        n = int(mask[b].sum())
        assert mask[b, order[b, :n]].all() and order[b, n - 1].item() == cut[1][b].item()
    assert mask[0, 10:16].all() and not mask[0, 16:20].any()


@needs_triton
@pytest.mark.parametrize("B", [1, 3, 6])  # B = 1 splits a row over programs (4 "SMs" in the interpreter)
def test_interpreter_equals_reference(B, gen):
    z, temp, seed, pos, cut = rows(B, 2500, gen)
    z[0, 5] = z[0, 2400] = 50.0  # a tie across blocks and chunks: the lowest index wins
    for mask in (None, cut):
        for noise in (True, False):
            got = gumbel_argmax(z, temp, seed, pos, mask, noise, _triton=True)
            assert torch.equal(got, reference_gumbel_argmax(z, temp, seed, pos, mask, noise)), (mask is None, noise)
    assert gumbel_argmax(z, temp, seed, pos, None, False, _triton=True)[0].item() == 5


@needs_triton
def test_interpreter_only_allowed_tokens(gen):
    z, temp, seed, pos, _ = rows(4, 1500, gen)
    temp.fill_(1.0)
    top = torch.argmax(z, -1)
    cut = (z.gather(1, top[:, None])[:, 0], top)  # only the top token
    assert torch.equal(gumbel_argmax(z, temp, seed, pos, cut, True, _triton=True), top)


@pytest.mark.gpu
def test_gpu_equals_reference_and_batch_invariant(gen):
    z, temp, seed, pos, cut = rows(64, 128256, gen, device="cuda")
    for mask in (None, cut):
        got = gumbel_argmax(z, temp, seed, pos, mask)
        assert torch.equal(got, reference_gumbel_argmax(z, temp, seed, pos, mask))
        for b in (0, 1, 37):  # alone (a row split over many programs) = in the batch
            one = gumbel_argmax(z[b:b + 1], temp[b:b + 1], seed[b:b + 1], pos[b:b + 1],
                                None if mask is None else (mask[0][b:b + 1], mask[1][b:b + 1]))
            assert one.item() == got[b].item()
