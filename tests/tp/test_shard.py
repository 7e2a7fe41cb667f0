"""A tiny Llama sharded with detcompile.tp.shard_llama and compiled with the deterministic backend
gives the same logits, bit for bit, at TP = 1, 2 and 4 (4: slow; gloo groups on the CPU), and a
prompt alone the same rows as in a batch. (The bits are decided by the row-parallel op, which
test_row_parallel checks at TP = 4 in the default run.)"""
import os

import pytest
import torch
import torch.distributed as dist

from ._util import run_ranks

CONFIG = dict(num_key_value_heads=4)  # 4 KV heads: TP = 4 gives each rank one


def _ids():
    return torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))


def _logits(rank, tp, group):
    from detcompile.models import tiny_model
    from detcompile.tp import shard_llama

    model = tiny_model("llama", **CONFIG)
    shard_llama(model, rank, tp, group)
    with torch.no_grad():
        return torch.compile(model, backend="deterministic")(input_ids=_ids()).logits


def _worker(rank, tp, out_dir):
    from detcompile.tp import register_group

    # the world's ranks as a named group: the group-by-name path of the ops
    register_group("all", dist.new_group(list(range(tp))))
    torch.save(_logits(rank, tp, "all"), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_logits_same_bits_as_tp_1(tmp_path, tp):
    run_ranks(_worker, tp, tp, str(tmp_path))
    want = _logits(0, 1, "")
    assert want.shape == (3, 9, 256)
    for rank in range(tp):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), rank
    # a prompt alone: its rows of the batch (TP = 1 here; every TP size has these bits)
    from detcompile.models import tiny_model
    from detcompile.tp import shard_llama

    model = tiny_model("llama", **CONFIG)
    shard_llama(model, 0, 1)
    with torch.no_grad():
        alone = torch.compile(model, backend="deterministic")(input_ids=_ids()[2:]).logits
    assert torch.equal(alone[0], want[2])


def test_refuses_sizes_that_do_not_divide():
    from detcompile.models import tiny_model
    from detcompile.tp import shard_llama

    with pytest.raises(ValueError, match="KV heads"):
        shard_llama(tiny_model("llama"), 0, 4)  # 2 KV heads
