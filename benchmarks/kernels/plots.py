"""matplotlib, when installed, and the axis style the section plots share."""
from __future__ import annotations

import warnings
from typing import Sequence


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a warning) if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log2_axis(ax, ticks: Sequence[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
