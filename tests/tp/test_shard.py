"""A tiny Llama sharded with detcompile.tp.shard_llama and compiled with the deterministic backend
gives the same logits, bit for bit, at TP = 1, 2 and 4 (gloo groups on the CPU), and a prompt alone
the same rows as in a batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4
CONFIG = dict(num_key_value_heads=4)  # 4 KV heads: TP = 4 gives each rank one


def _ids():
    return torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))


def _logits(rank, tp, group):
    import detcompile  # noqa: F401  (registers the ops and the backend in a spawned process)
    from detcompile.models import tiny_model
    from detcompile.tp import shard_llama

    model = tiny_model("llama", **CONFIG)
    shard_llama(model, rank, tp, group)
    with torch.no_grad():
        return torch.compile(model, backend="deterministic")(input_ids=_ids()).logits


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from detcompile.tp import register_group

        pair = dist.new_group([0, 1])  # every rank takes part in creating it; ranks 0 and 1 run TP = 2 in it
        torch.save(_logits(rank, WORLD, ""), os.path.join(out_dir, f"tp4_rank{rank}.pt"))
        if rank < 2:  # (one pair is enough: a compile per process is the slow part)
            register_group("pair", pair)
            torch._dynamo.reset()
            torch.save(_logits(rank, 2, "pair"), os.path.join(out_dir, f"tp2_rank{rank}.pt"))
        dist.barrier()  # nobody tears the group down while another rank still talks in it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logits_same_bits_at_tp_1_2_4(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    want = _logits(0, 1, "")
    assert want.shape == (3, 9, 256)
    for tp in (2, WORLD):
        for rank in range(tp):
            got = torch.load(tmp_path / f"tp{tp}_rank{rank}.pt")
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (tp, rank)
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
