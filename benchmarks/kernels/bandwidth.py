"""The memory-bandwidth ceiling every GB/s figure of the benchmark is compared with.

What is measured. One buffer of ``nbytes`` (1 GiB of bf16, ``randn``: memory compression could make
zeros cheaper to move) is streamed by three operations, each timed two ways:

============  ==========================================  =====================================
method        operation                                   bytes moved per call
============  ==========================================  =====================================
memcpy        ``dst.copy_(src)``                           ``2 * nbytes`` (read src, write dst)
copy_kernel   ``torch.neg(src, out=dst)``                  ``2 * nbytes`` (read src, write dst)
read          ``torch.sum(src)``                           ``nbytes`` (read src; one value out)
============  ==========================================  =====================================

* ``graph``: :class:`~benchmarks.kernels.timing.GraphTimer`, the timer of every kernel in the tables
  (a CUDA graph of ~10 ms of calls, median over replays);
* ``eager``: :class:`~benchmarks.kernels.timing.EagerTimer`, the same calls launched back to back
  between two CUDA events, without a graph.

Neither times anything but the calls (no L2 flush, no memset): the buffer is over 15x the L2 cache
(50 MB on an H100, 60 MB on an H200), so every call reads and writes memory. GB/s = bytes moved /
time of one call, 1 GB = 1e9 bytes: the convention of every figure in the tables (RMSNorm, softmax,
matmul at small M: bytes read + bytes written; the decode floor: KV bytes read).

The ceiling is the best of the six figures ("what the memory can do"); the JSON record keeps all six
(``measurements``), the best read + write figure (``copy_gbps``) and the best read-only one
(``read_gbps``). A read-only stream can beat a copy (no read/write turnaround), and GEMV at M=1 is
one, so the read figure belongs in the ceiling.

Why not ``dst.copy_(src)`` in a graph alone, as before. A same-dtype contiguous ``copy_`` runs no
ATen kernel: ``copy_device_to_device`` (aten/src/ATen/native/cuda/Copy.cu) hands it to
``cudaMemcpyAsync(..., cudaMemcpyDeviceToDevice)``, and under stream capture it becomes a memcpy node
of the graph, which the driver carries out its own way (NVIDIA/cccl#1672: cudaMemcpy D2D reaches
about 66% of an H200's bandwidth; pytorch/pytorch#191284: a contiguous ``copy_`` up to 2.1x slower
in a CUDA graph than eagerly, at some sizes). That one figure was the whole ceiling: 2431 GB/s on an
H100 (73% of its 3.35 TB/s) and 2713 GB/s on an H200 (57% of 4.8 TB/s), while the same bf16
``dst.copy_(src)`` timed eagerly by ``benchmarks.engine`` read 4248 GB/s on an H200. SM kernels
(RMSNorm, cuBLAS GEMV) then ran at 139% and 162% "of copy bandwidth". The byte count (read + write)
and the timer's arithmetic (event time of a replay / calls in the graph) were right; the operation
timed was a slow path that no kernel in the tables takes.
"""
from __future__ import annotations

import dataclasses
import traceback
from typing import Callable

import torch

from benchmarks.kernels.measures import DTYPE, gbps
from benchmarks.kernels.tables import fmt, markdown_table
from benchmarks.kernels.timing import EagerTimer, Timing


def memcpy(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The driver's device-to-device copy (same dtype, contiguous: ``cudaMemcpyAsync``)."""
    return dst.copy_(src)


def copy_kernel(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """An elementwise SM kernel that reads src once and writes dst once (``neg``: not a memcpy)."""
    return torch.neg(src, out=dst)


def read_all(src: torch.Tensor) -> torch.Tensor:
    """A reduction that reads src once and writes one value."""
    return torch.sum(src)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    operation: str  #: what the report shows
    fn: Callable
    reads_only: bool  #: True: bytes moved = nbytes (read); False: 2 * nbytes (read + write)

    def bytes_moved(self, nbytes: int) -> int:
        return nbytes if self.reads_only else 2 * nbytes

    def args(self, src: torch.Tensor, dst: torch.Tensor) -> tuple:
        return (src,) if self.reads_only else (src, dst)


METHODS = (
    Method("memcpy", "dst.copy_(src)", memcpy, reads_only=False),
    Method("copy_kernel", "torch.neg(src, out=dst)", copy_kernel, reads_only=False),
    Method("read", "torch.sum(src)", read_all, reads_only=True),
)


def measurement(method: Method, timer_name: str, nbytes: int, t: Timing) -> dict:
    moved = method.bytes_moved(nbytes)
    return {"method": method.name, "operation": method.operation, "timer": timer_name, "bytes_moved": moved,
            "seconds": t.seconds, "gbps": gbps(moved, t.seconds), "graphed": t.graphed}


def failed_measurement(method: Method, timer_name: str, nbytes: int, err: Exception) -> dict:
    return {"method": method.name, "operation": method.operation, "timer": timer_name,
            "bytes_moved": method.bytes_moved(nbytes), "seconds": None, "gbps": None, "graphed": None,
            "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}


def ceiling_record(nbytes: int, measurements: list[dict]) -> dict:
    """The ceiling (the best measured GB/s) and the details. ``gbps``, ``seconds``, ``bytes`` and
    ``graphed`` keep the names the report and ``benchmarks.norm_schedules`` read."""
    ok = [m for m in measurements if m["gbps"] is not None]
    if not ok:
        raise RuntimeError("no bandwidth measurement succeeded: "
                           + "; ".join(f"{m['method']}/{m['timer']}: {m.get('error')}" for m in measurements))
    best = max(ok, key=lambda m: m["gbps"])

    def best_of(reads_only: bool) -> float | None:
        vals = [m["gbps"] for m in ok if (m["bytes_moved"] == nbytes) == reads_only]
        return max(vals, default=None)

    return {
        "bytes": nbytes, "gbps": best["gbps"], "seconds": best["seconds"], "bytes_moved": best["bytes_moved"],
        "graphed": best["graphed"], "method": best["method"], "timer": best["timer"],
        "copy_gbps": best_of(False), "read_gbps": best_of(True), "measurements": measurements,
    }


def measure_copy_bandwidth(timer: Callable[..., Timing], device: torch.device, nbytes: int,
                           eager_timer: Callable[..., Timing] | None = None,
                           methods: tuple[Method, ...] = METHODS) -> dict:
    """Every method of ``methods`` timed by ``timer`` (the kernels' graph timer) and by
    ``eager_timer`` (default: an :class:`EagerTimer` like ``timer`` on a CUDA device, none elsewhere);
    returns :func:`ceiling_record`. A measurement that raises is recorded with its error."""
    if eager_timer is None and device.type == "cuda":
        eager_timer = EagerTimer(getattr(timer, "target_s", 0.01), getattr(timer, "replays", 10))
    timers = {"graph": timer} | ({"eager": eager_timer} if eager_timer is not None else {})
    src = torch.randn(nbytes // DTYPE.itemsize, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    measurements = []
    try:
        for method in methods:
            for name, tm in timers.items():
                try:
                    measurements.append(measurement(method, name, nbytes, tm(method.fn, *method.args(src, dst))))
                except Exception as err:  # noqa: BLE001 - one failed way of measuring leaves the others
                    traceback.print_exc()
                    measurements.append(failed_measurement(method, name, nbytes, err))
    finally:
        del src, dst
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return ceiling_record(nbytes, measurements)


def ceiling_line(copy: dict) -> str:
    return (f"bandwidth ceiling: **{copy['gbps']:.0f} GB/s** ({copy.get('method', 'memcpy')}, "
            f"{copy.get('timer', 'graph')} timer, {copy['bytes'] / 2**30:.3g} GiB bf16); every % below is of this "
            f"figure (best read + write: {fmt(copy.get('copy_gbps'), '.0f')} GB/s, best read-only: "
            f"{fmt(copy.get('read_gbps'), '.0f')} GB/s)")


def ceiling_markdown(copy: dict) -> str:
    """The measurements behind the ceiling, as a markdown table (empty for an old record without them)."""
    rows = [[m["method"], f"`{m['operation']}`", m["timer"],
             "read" if m["bytes_moved"] == copy["bytes"] else "read + write",
             fmt(None if m["seconds"] is None else m["seconds"] * 1e3, ".3f"), fmt(m["gbps"], ".0f"),
             m.get("error", "")]
            for m in copy.get("measurements", [])]
    if not rows:
        return ""
    return markdown_table(["method", "operation", "timer", "bytes", "ms / call", "GB/s", "error"], rows)
