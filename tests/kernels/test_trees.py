"""The Triton pairwise trees (detcompile.kernels._trees)."""
import torch

from detcompile.kernels import _common

from ._util import LAUNCH_DEV, needs_triton

if _common.HAS_TRITON:
    from detcompile.kernels._trees import tree_sum

    tl, triton = _common.tl, _common.triton

    @triton.jit
    def _tree_pair_vs_split(x_ptr, a_ptr, b_ptr, LOG2: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, 1 << LOG2))
        tl.store(a_ptr, tree_sum(x, LOG2))
        y = x
        for _ in tl.static_range(LOG2):
            u, v = tl.split(tl.reshape(y, (y.shape[0] // 2, 2)))
            y = u + v
        tl.store(b_ptr, tl.sum(y, axis=0))


@needs_triton
def test_tree_sum_is_the_split_tree(gen):
    # tree_sum (pairs summed by tl.sum over an axis of 2) is the old split-based tree.
    for _ in range(3):
        x = (torch.randn(1024, generator=gen) * torch.logspace(-8, 8, 1024)).to(LAUNCH_DEV)
        a = torch.empty(1, device=LAUNCH_DEV)
        b = torch.empty(1, device=LAUNCH_DEV)
        _tree_pair_vs_split[(1,)](x, a, b, LOG2=10)
        assert torch.equal(a, b)
