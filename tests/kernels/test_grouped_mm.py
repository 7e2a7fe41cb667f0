import pytest
import torch

from detcompile.kernels._common import UnsupportedError

from ._util import grouped_mm_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_bitwise_whatever_its_group_holds(dtype, gen):
    # A token's expert output must not depend on how many other tokens chose the same expert.
    w = torch.randn(4, 37, 29, generator=gen).to(dtype)
    target = torch.randn(1, 37, generator=gen).to(dtype)
    ref = torch.ops.detcompile.grouped_mm(target, w, torch.tensor([0, 0, 1, 1], dtype=torch.int32))[0]
    for n_before, n_after in ((0, 3), (5, 0), (2, 7)):
        others = torch.randn(n_before + n_after, 37, generator=gen).to(dtype)
        x = torch.cat([others[:n_before], target, others[n_before:]])
        # group 2 holds the target among its neighbours
        offs = torch.tensor([0, 0, n_before + 1 + n_after, n_before + 1 + n_after], dtype=torch.int32)
        out = torch.ops.detcompile.grouped_mm(x, w, offs)
        assert torch.equal(out[n_before], ref)


def test_accuracy_and_rows_past_last_offset_are_zero(gen):
    x = torch.randn(10, 16, generator=gen)
    w = torch.randn(3, 16, 8, generator=gen)
    offs = torch.tensor([2, 5, 8], dtype=torch.int32)
    out = torch.ops.detcompile.grouped_mm(x, w, offs)
    ref = grouped_mm_ref(x, w, offs)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(out[8:], torch.zeros(2, 8))


def test_opcheck(gen):
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(2, 8, 5, generator=gen)
    torch.library.opcheck(torch.ops.detcompile.grouped_mm.default, (x, w, torch.tensor([3, 6], dtype=torch.int32)))


def test_bad_inputs_are_clear_errors(gen):
    x = torch.randn(6, 8, generator=gen)
    with pytest.raises(UnsupportedError, match="K mismatch"):
        torch.ops.detcompile.grouped_mm(x, torch.randn(2, 7, 5), torch.tensor([3, 6], dtype=torch.int32))
    with pytest.raises(UnsupportedError, match="offs"):
        torch.ops.detcompile.grouped_mm(x, torch.randn(2, 8, 5), torch.tensor([3.0, 6.0]))


@pytest.mark.gpu
def test_gpu_row_bitwise_and_matches_cpu_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, 256, generator=g).to(torch.bfloat16).cuda()
    x = torch.randn(40, 512, generator=g).to(torch.bfloat16).cuda()
    offs = torch.tensor([10, 20, 30, 40], dtype=torch.int32, device="cuda")
    out = torch.ops.detcompile.grouped_mm(x, w, offs)
    alone = torch.ops.detcompile.grouped_mm(x[15:16], w, torch.tensor([0, 1, 1, 1], dtype=torch.int32, device="cuda"))
    assert torch.equal(out[15], alone[0])
    ref = grouped_mm_ref(x.cpu(), w.cpu(), offs.cpu())
    assert ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-2
