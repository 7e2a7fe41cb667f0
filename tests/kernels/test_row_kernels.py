"""The row kernels' shared tiling and split-row schedule choice (detcompile.kernels.row_kernels)."""
import pytest

from detcompile.kernels import row_kernels as rk


def test_row_plan_depends_on_length_only():
    seg = rk.ROW_LANES * rk.ROW_SEG_CHUNKS
    for R in [1, 2, 3, 77, 1000, 1024, 1025, 4096, 5120, seg, seg + 1, 32000, 128256]:
        p = rk.row_plan(R)
        assert p == rk.row_plan(R)
        for v in (p.lanes, p.chunks, p.segments and rk._next_pow2(p.segments)):
            assert v & (v - 1) == 0
        if R <= seg:
            assert p.segments == 1 and p.lanes * p.chunks >= R and p.lanes == min(rk.ROW_LANES, rk._next_pow2(R))
        else:
            assert (p.rows, p.lanes, p.chunks) == (1, rk.ROW_LANES, rk.ROW_SEG_CHUNKS)
            assert (p.segments - 1) * seg < R <= p.segments * seg
    assert rk.row_plan(4096).segments == 1 and rk.row_plan(128256).segments == 16
    assert rk.row_plan(rk.ROW_MAX_SEGMENTS * seg + 1) is None  # the chunk-loop kernel


def test_schedule_choice(monkeypatch):
    monkeypatch.delenv("DETCOMPILE_ROW_SCHEDULE", raising=False)
    monkeypatch.delenv("DETCOMPILE_ROW_SYNC", raising=False)
    G, many = 16, rk.ROW_MAX_SYNC_SEGMENTS + 1
    default = "two_launch" if rk._common.triton_interpret() else "sync"  # programs meet only on a GPU
    assert rk.requested_schedule() is None and rk.choose_schedule(8192, G) == default
    monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")  # the old switch, off: two launches
    assert rk.choose_schedule(1, G) == "two_launch"
    monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")  # the old switch still works
    assert rk.choose_schedule(1, G) == "sync"
    assert rk.choose_schedule(1, many) == "two_launch"
    monkeypatch.setenv("DETCOMPILE_ROW_SCHEDULE", "row_loop")  # wins over DETCOMPILE_ROW_SYNC
    assert rk.choose_schedule(1, G) == "row_loop" and rk.choose_schedule(1, many) == "row_loop"
    monkeypatch.setenv("DETCOMPILE_ROW_SCHEDULE", "two_launch")
    assert rk.choose_schedule(1, G) == "two_launch"
    monkeypatch.setenv("DETCOMPILE_ROW_SCHEDULE", "sync")
    assert rk.choose_schedule(1, G) == "sync" and rk.choose_schedule(1, many) == "two_launch"
    monkeypatch.setenv("DETCOMPILE_ROW_SCHEDULE", "rowloop")
    with pytest.raises(ValueError, match="DETCOMPILE_ROW_SCHEDULE"):
        rk.choose_schedule(1, G)
    # The in-process override wins over the environment, and is undone on exit (also on error).
    monkeypatch.setenv("DETCOMPILE_ROW_SCHEDULE", "two_launch")
    warps = rk.ROW_LOOP_NUM_WARPS
    with rk.row_schedule("row_loop", row_loop_warps=16):
        assert rk.choose_schedule(1, G) == "row_loop" and rk.ROW_LOOP_NUM_WARPS == 16
        with rk.row_schedule(None):  # None: the environment decides
            assert rk.choose_schedule(1, G) == "two_launch" and rk.ROW_LOOP_NUM_WARPS == 16
        assert rk.choose_schedule(1, G) == "row_loop"
    assert rk.choose_schedule(1, G) == "two_launch" and rk.ROW_LOOP_NUM_WARPS == warps
    with pytest.raises(RuntimeError):
        with rk.row_schedule("sync"):
            raise RuntimeError
    assert rk.requested_schedule() == "two_launch"
    for bad in (dict(name="fast"), dict(name="row_loop", row_loop_warps=6)):
        with pytest.raises(ValueError):
            with rk.row_schedule(**bad):
                pass
    # A request wins over the default, whatever the row count.
    monkeypatch.delenv("DETCOMPILE_ROW_SCHEDULE")
    monkeypatch.delenv("DETCOMPILE_ROW_SYNC")
    with rk.row_schedule("two_launch"):
        assert rk.choose_schedule(4096, G) == "two_launch"
