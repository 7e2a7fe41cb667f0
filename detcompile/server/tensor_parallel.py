"""``detcompile serve --tp N`` (N > 1): the launching process starts N rank processes and watches them.

Each rank joins one process group (gloo on the CPU; NCCL on CUDA, rank r on ``cuda:r``), loads the
same model (the named models are seeded, a checkpoint is read by every rank; the ranks compare
weight digests) and builds ``Engine(..., tensor_parallel_size=N)``, which shards it. Rank 0 serves
HTTP on the socket the launcher bound; its engine thread keeps the others in step (``lockstep``).

Stopping: SIGINT / SIGTERM to the launcher stop rank 0's HTTP server, whose engine thread then tells
the followers to shut down (followers ignore SIGINT, so a Ctrl-C in the terminal takes that path
too). A rank that exits with an error makes the launcher stop the others and report its traceback.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import time
from datetime import timedelta

#: How long the launcher waits, after a stop signal, for the ranks to exit before it kills them.
STOP_GRACE_SECONDS = 30.0
#: The default group's timeout: the ranks meet in the engine's warm-up, after each has loaded the model.
INIT_TIMEOUT = timedelta(minutes=30)


def check_tp_args(args) -> None:
    """Refuse a --tp setup that cannot work, before any rank starts (ValueError, one line)."""
    from ..tp import check_shardable
    from .loading import model_skeleton, resolve_device

    tp = args.tp
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if args.no_deterministic:
        raise ValueError("--tp needs the deterministic kernels (its reductions are the same bits at every TP size): "
                         "drop --no-deterministic")
    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        if device.index is not None:
            raise ValueError(f"--tp {tp} puts rank r on cuda:r: pass --device cuda (choose the GPUs with "
                             f"CUDA_VISIBLE_DEVICES), not {args.device}")
        if torch.cuda.device_count() < tp:
            raise ValueError(f"--tp {tp} needs {tp} GPUs, one per rank; {torch.cuda.device_count()} visible")
    elif device.type != "cpu":
        raise ValueError(f"--tp runs on cpu or cuda, not {device.type}")
    check_shardable(model_skeleton(args.model, device=args.device), tp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, sock: socket.socket) -> int:
    """Run the N ranks until they stop; 0 after a requested stop, an error if a rank failed."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    log = logging.getLogger("detcompile.server")
    ctx = None
    stop_at: list[float] = []

    def on_signal(signum, frame):
        if stop_at:  # a second signal: no more waiting
            if ctx is not None:
                _kill_all(ctx)
            return
        stop_at.append(time.monotonic())
        log.info("tensor parallel: stopping the %d ranks", args.tp)
        if ctx is not None:
            _signal(ctx.processes[0], signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ctx = mp.start_processes(_rank_main, args=(args.tp, _free_port(), args, sock), nprocs=args.tp, join=False,
                                 start_method="spawn")
        sock.close()  # rank 0 holds its own copy
        if stop_at:  # a signal came while the ranks were being started
            _signal(ctx.processes[0], signal.SIGTERM)
        while True:
            try:
                if ctx.join(timeout=0.5):
                    return 0
            except ProcessException as e:  # join has stopped the other ranks
                if stop_at:  # (perhaps because of the stop: say what, not the whole traceback)
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    log.warning("tensor parallel: rank %d ended with an error while stopping: %s", e.error_index, last)
                    return 1
                raise RuntimeError(f"tensor-parallel rank {e.error_index} failed, so every rank was stopped: "
                                   f"{str(e).strip()}") from None
            if stop_at and time.monotonic() - stop_at[0] > STOP_GRACE_SECONDS:
                log.error("tensor parallel: the ranks did not stop in %.0f s; killing them", STOP_GRACE_SECONDS)
                _kill_all(ctx)
                return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if ctx is not None:
            _kill_all(ctx)  # nothing is left behind, however the launcher ends


def _signal(process, signum) -> None:
    try:
        if process.is_alive():
            os.kill(process.pid, signum)
    except (OSError, ValueError):
        pass


def _kill_all(ctx) -> None:
    for p in ctx.processes:
        _signal(p, signal.SIGKILL)


def _rank_main(rank: int, world: int, dist_port: int, args, sock: socket.socket) -> None:
    """One rank (a spawned process): join the group, build the engine, then serve (rank 0) or follow."""
    import torch
    import torch.distributed as dist

    if rank > 0:
        sock.close()
        # A Ctrl-C in the terminal reaches every rank; a follower stops when rank 0 says so (or is gone).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        # SIGTERM stops rank 0 as SIGINT does (KeyboardInterrupt, once uvicorn has shut down and raised
        # the signal again): its engine thread tells the followers, and the rank exits 0.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    log = logging.getLogger("detcompile.server")
    from .loading import resolve_device

    on_cuda = resolve_device(args.device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{dist_port}", rank=rank,
                            world_size=world, timeout=INIT_TIMEOUT)
    try:
        _run_rank(rank, world, args, sock, f"cuda:{rank}" if on_cuda else "cpu", log)
    finally:
        dist.destroy_process_group()
    # Stopped cleanly (HTTP closed, followers told, group destroyed): run the exit handlers (logging,
    # multiprocessing's semaphores), then skip the interpreter's teardown, seconds of freeing compiled
    # graphs per rank. (An error propagates instead, for the launcher to report.)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(rank: int, world: int, args, sock, device: str, log) -> None:
    import torch.distributed as dist

    from .cli import build_engine, serve_http
    from .fingerprint import model_digests
    from .loading import load_model
    from .lockstep import LeaderEngine, control_group, follow

    group = control_group()
    model, tok, name = load_model(args.model, device=device, dtype=args.dtype, tokenizer=args.tokenizer,
                                  seed=args.seed)
    digests = model_digests(model)  # of the whole model, before the engine shards it in place
    every = [None] * world
    dist.all_gather_object(every, digests, group=group)
    if any(d != digests for d in every):
        raise RuntimeError(f"tensor parallel: the ranks loaded different models (weights/config digests per rank: "
                           f"{[(d['weights_sha256'][:12], d['config_sha256'][:12]) for d in every]})")
    engine = build_engine(args, model, tok, tensor_parallel_size=world)
    if rank > 0:
        follow(engine, group, rank)
        log.info("tensor parallel: rank %d stopped", rank)
        return
    # A broken lockstep stops the HTTP server as a Ctrl-C would; the rank then reports the failure.
    leader = LeaderEngine(engine, group, on_broken=lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        serve_http(args, sock, leader, name, digests)
    except KeyboardInterrupt:
        pass  # the stop signal
    finally:
        leader.end()  # (done already when the engine thread ended normally)
    if leader.broken:
        raise RuntimeError(f"tensor parallel: {leader.broken}")
    log.info("tensor parallel: rank 0 stopped")
