"""Kernel speed (issue #3): detcompile's batch-invariant kernels against cuBLAS, torch and SDPA.

    python -m benchmarks.kernels [--only matmul,norms,attention] [--quick] [--out docs/benchmarks_kernels]
                                 [--page-size 16]
    python -m benchmarks.kernels --only bandwidth [--out out/benchmarks_kernels_bandwidth]

Needs one CUDA GPU (written for an H100; sized to finish well under 4 minutes including Triton
compiles, ``--quick`` under 90 s; not yet run on a GPU when written). Sections:

* bandwidth ceiling, always (``--only bandwidth``: only it, in seconds): one 1 GiB bf16 buffer streamed
  by ``dst.copy_(src)`` (the driver's memcpy), ``torch.neg(src, out=dst)`` (an SM copy kernel; both
  count read + write bytes) and ``torch.sum(src)`` (read bytes), each timed inside a CUDA graph and
  eagerly back to back; the ceiling is the best GB/s, the JSON keeps all six (``bandwidth`` module
  docstring: why a graphed ``copy_`` alone read 57-73% of the HBM rate). Every GB/s figure below is
  compared with it (the columns keep the name "% copy").
* ``matmul``: bf16 Llama-3-8B weight shapes, ``detcompile.matmul(a, w.t())`` against ``torch.mm``
  (cuBLAS); TFLOP/s, ratio, the bitwise check of row 0 against M=1, GB/s for decode-sized M.
* ``norms``: ``detcompile.rms_norm`` / ``softmax`` / ``log_softmax`` over [T, 4096] and [T, 128256]
  against the stock torch ops; GB/s against copy bandwidth.
* ``attention``: 32 query / 8 KV heads, head dim 128: causal prefill against SDPA (flash), and decode
  from a paged cache (``detcompile.kernels.paged_attention.paged_attention``, skipped while it does not
  exist) against the bandwidth floor (KV bytes / bandwidth ceiling).

Timing: each number is the median, over replays, of one call inside a CUDA graph that holds many calls
(:class:`GraphTimer`), so Python and launch overhead are left out for detcompile and the baselines
alike. Every function runs eagerly first (which compiles its Triton kernels), outside the graph. The
inputs rotate over enough copies that a graph's working set is at least 4x the L2 cache: a weight or
activation that fits in L2 would otherwise be read from L2 on every call after the first, and
memory-bound kernels would look faster than the memory. Nothing else runs between the two events
around a replay (no L2 flush, no memset), so small kernels are not charged for one. A figure above
105% of the ceiling is listed in the report: it means the ceiling is too low.

Output: markdown tables on stdout (progress bars on stderr); ``<out>.md`` (the tables, with date,
device and versions), ``<out>.json`` (raw numbers) and ``<out>_{matmul,norms,attention}.png``
(matplotlib, the ``bench`` extra; skipped with a warning if it is missing). The reports are rewritten
after each section, so an interrupted run keeps what it measured.

The pure helpers (formatting, ratios, targets, bitwise checks, paged-cache layout) are tested on the
CPU in ``tests/benchmarks``; the timings need the GPU.

Layout: ``cli`` (arguments, ``main``), ``sections`` (running a section), ``matmul``, ``norms`` and
``attention`` (each family's cells, records, summary, tables, runner and plot), ``bandwidth`` (the
bandwidth ceiling), ``timing`` (``GraphTimer``, ``EagerTimer``), ``shapes`` (the grids), ``context`` (what a
runner is given), ``measures`` (arithmetic and bitwise checks), ``tables`` (formatting and
targets), ``report`` (the markdown/JSON/PNG files).
"""
