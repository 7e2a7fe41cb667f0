"""Timing: ``GraphTimer`` (CUDA graphs, for the kernels), ``EagerTimer`` (back-to-back launches, for the
bandwidth ceiling) and the pure arithmetic they rest on.

What the timed region holds. Both timers record a CUDA event, launch the measured calls and nothing
else, record a second event, and divide the elapsed time by the number of calls launched in between.
There is no L2 flush, memset or copy of inputs inside (or between) the timed calls: the inputs are
kept out of L2 by rotating over enough copies of them (``rotation_count``; ``GraphTimer``), or by
being much larger than L2 (the bandwidth buffers; ``EagerTimer``). Warm-up calls, clones and the
graph capture happen before the first event. ``tests/benchmarks`` checks this with a fake clock.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import warnings
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: float  #: median time of one call
    graphed: bool = True  #: False: the graph capture failed and the calls were timed eagerly (marked †)


def rotation_count(bytes_per_call: int, rotate_bytes: int, max_copies: int) -> int:
    """How many copies of a call's inputs make a working set of at least ``rotate_bytes``."""
    if bytes_per_call <= 0:
        return max_copies
    return max(1, min(max_copies, math.ceil(rotate_bytes / bytes_per_call)))


def calls_per_graph(est_s: float, target_s: float, copies: int, max_calls: int) -> int:
    """Calls in one graph: about ``target_s`` of work, at least one per input copy, whole rotations."""
    calls = round(target_s / max(est_s, 1e-9))
    calls = max(copies, min(calls, max_calls))
    return math.ceil(calls / copies) * copies


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_of(o)]
    return []


def tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


def clone_tensors(args: tuple) -> tuple:
    """Fresh copies of the tensor arguments, same strides (a transposed weight stays transposed)."""
    return tuple(a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a for a in args)


def l2_cache_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def capture_graph(fn: Callable, arg_sets: list[tuple], calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    # The last outputs stay alive during the capture, so the output addresses rotate with the inputs.
    recent = collections.deque(maxlen=len(arg_sets))
    with torch.cuda.graph(graph):
        for i in range(calls):
            recent.append(fn(*arg_sets[i % len(arg_sets)]))
    return graph


def elapsed_seconds(work: Callable[[], None], repeats: int) -> list[float]:
    """CUDA-event time of ``work`` (GPU time, the host waits after each repeat)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def back_to_back_seconds(fn: Callable, arg_sets: list[tuple], target_s: float, replays: int,
                         max_calls: int) -> float:
    """Median time of one call, launching about ``target_s`` of calls back to back (cycling over
    ``arg_sets``) between two CUDA events, ``replays`` times. The host does not wait between the calls
    of one replay, so the GPU runs them back to back; only the first launch's latency is included."""
    def run(calls):
        for i in range(calls):
            fn(*arg_sets[i % len(arg_sets)])

    est = min(elapsed_seconds(lambda: run(len(arg_sets)), 2)) / len(arg_sets)
    calls = calls_per_graph(est, target_s, len(arg_sets), max_calls)
    return statistics.median(t / calls for t in elapsed_seconds(lambda: run(calls), replays))


class EagerTimer:
    """``timer(fn, *args) -> Timing``: the median time of one call launched eagerly, back to back,
    without a CUDA graph (``graphed=False``). No input rotation: meant for buffers much larger than L2
    (the bandwidth ceiling), where every call reads memory anyway. Used next to ``GraphTimer`` so a
    call that runs slower inside a graph than outside (a driver memcpy node) is seen."""

    def __init__(self, target_s: float = 0.01, replays: int = 10, max_calls: int = 1000):
        self.target_s, self.replays, self.max_calls = target_s, replays, max_calls

    def __call__(self, fn: Callable, *args) -> Timing:
        fn(*args)  # warm-up (compiles, creates handles), outside the timed region
        torch.cuda.synchronize()
        return Timing(back_to_back_seconds(fn, [args], self.target_s, self.replays, self.max_calls), graphed=False)


class GraphTimer:
    """``timer(fn, *args) -> Timing``: the median time of one call, replaying a CUDA graph of many.

    One graph holds about ``target_s`` of calls (at most ``max_calls``), cycling over copies of the
    tensor arguments whose total size is at least ``rotate_bytes`` (default 4x L2). A launcher that
    cannot be captured (a host sync) is timed eagerly instead, with a warning, and marked.
    """

    def __init__(self, target_s: float = 0.01, replays: int = 10, rotate_bytes: int | None = None,
                 max_calls: int = 1000, max_copies: int = 64):
        self.target_s, self.replays, self.max_calls, self.max_copies = target_s, replays, max_calls, max_copies
        self.rotate_bytes = 4 * l2_cache_bytes() if rotate_bytes is None else rotate_bytes
        self._side = torch.cuda.Stream()

    def __call__(self, fn: Callable, *args) -> Timing:
        out_bytes = tensor_bytes(self._warm_up(fn, args))
        copies = rotation_count(tensor_bytes(args) + out_bytes, self.rotate_bytes, self.max_copies)
        arg_sets = [args] + [clone_tensors(args) for _ in range(copies - 1)]
        try:
            return Timing(self._graph_seconds(fn, arg_sets), graphed=True)
        except RuntimeError as err:
            if "captur" not in str(err).lower():
                raise
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture failed for {getattr(fn, '__name__', fn)}; timing it eagerly "
                          f"(launch overhead included): {str(err).splitlines()[0]}")
            return Timing(self._eager_seconds(fn, arg_sets), graphed=False)

    def _warm_up(self, fn: Callable, args: tuple):
        # Compiles Triton kernels and creates library handles outside the graph; a side stream, as
        # torch.cuda.graph's documentation recommends before a capture.
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            fn(*args)
            out = fn(*args)
        torch.cuda.current_stream().wait_stream(self._side)
        torch.cuda.synchronize()
        return out

    def _graph_seconds(self, fn: Callable, arg_sets: list[tuple]) -> float:
        copies = len(arg_sets)
        graph = capture_graph(fn, arg_sets, copies)
        graph.replay()  # the first replay uploads the graph
        est = min(elapsed_seconds(graph.replay, 2)) / copies
        calls = calls_per_graph(est, self.target_s, copies, self.max_calls)
        if calls != copies:
            del graph
            graph = capture_graph(fn, arg_sets, calls)
            graph.replay()
        return statistics.median(t / calls for t in elapsed_seconds(graph.replay, self.replays))

    def _eager_seconds(self, fn: Callable, arg_sets: list[tuple]) -> float:
        return back_to_back_seconds(fn, arg_sets, self.target_s, self.replays, self.max_calls)
