"""Fixed pairwise trees in Triton: the reduction order of every batch-invariant row sum.

Each level adds lane ``2i`` to lane ``2i+1`` by a ``tl.sum`` over an axis of size 2: one addition,
whose result cannot depend on operand order (a + b == b + a bitwise), so the association is fixed
by the program text and not by the register layout the compiler picks. Used by the reduce op's lane
tree and by the row kernels (rms_norm, layer_norm, softmax; ``row_kernels.tile_sum``).
The CPU counterpart is ``_cpu.tree_sum``.
"""
from __future__ import annotations

from ._common import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def tree_sum(x, LOG2: tl.constexpr):
        """Sum of a [2**LOG2] vector by a fixed pairwise tree (lane 2i + lane 2i+1 per level).

        Each level is a ``tl.sum`` over an axis of size 2: the sum of two numbers has one possible
        result (a + b == b + a bitwise), so the layout cannot change it, and it compiles to
        in-register adds and warp shuffles (``tl.split`` made every thread redo the whole tree).
        """
        for _ in tl.static_range(LOG2):
            x = tl.sum(tl.reshape(x, (x.shape[0] // 2, 2)), axis=1)
        # One element left: the 1-element reduction is just that element.
        return tl.sum(x, axis=0)

    @triton.jit
    def tree_max(x, LOG2: tl.constexpr):
        """NaN-propagating max of a [2**LOG2] vector (max is exact; the tree keeps NaN handling
        explicit, since tl.max does not propagate NaN)."""
        for _ in tl.static_range(LOG2):
            a, b = tl.split(tl.reshape(x, (x.shape[0] // 2, 2)))
            x = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
        return tl.max(x, axis=0)

    @triton.jit
    def tree_min(x, LOG2: tl.constexpr):
        for _ in tl.static_range(LOG2):
            a, b = tl.split(tl.reshape(x, (x.shape[0] // 2, 2)))
            x = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
        return tl.min(x, axis=0)

    @triton.jit
    def pair_sum_2d(x, LOG2: tl.constexpr):
        """[A, 2**LOG2] -> [A]: fixed pairwise tree along the last axis (see ``tree_sum``)."""
        for _ in tl.static_range(LOG2):
            x = tl.sum(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)), axis=2)
        return tl.reshape(x, (x.shape[0],))

    @triton.jit
    def pair_sum_3d(x, LOG2: tl.constexpr):
        """[A, B, 2**LOG2] -> [A, B]: fixed pairwise tree along the last axis."""
        for _ in tl.static_range(LOG2):
            x = tl.sum(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)), axis=3)
        return tl.reshape(x, (x.shape[0], x.shape[1]))
