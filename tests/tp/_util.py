"""Running a function on every rank of a CPU (gloo) process group: the tensor-parallel tests' harness."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import detcompile  # noqa: F401  (registers the ops and the backend in the spawned process)

        fn(rank, *args)
        dist.barrier()  # nobody tears the group down while another rank still talks in it
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """``fn(rank, *args)`` in ``world`` spawned processes of one initialized gloo group (``fn`` must be a
    module-level function: it is pickled); raises if any rank fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, fn, args), nprocs=world, join=True, start_method="spawn")
