"""Parameter sweeps too slow for the default CPU run: a few values run there, the others are marked
``slow`` on a machine without CUDA (``-m slow`` or ``DETCOMPILE_RUN_SLOW=1`` runs them). On a GPU every
value runs in the default run, so no coverage is lost where the kernels are compiled."""
import pytest
import torch

_ON_GPU = torch.cuda.is_available()


def cpu_subset(values, keep) -> list:
    """``values`` as parametrize arguments (tuples for several names), those not in ``keep`` slow on the CPU."""
    keep = list(keep)
    missing = [k for k in keep if k not in values]
    if missing:
        raise ValueError(f"cpu_subset: {missing} not among the values")
    out = []
    for v in values:
        args = v if isinstance(v, tuple) else (v,)
        marks = () if _ON_GPU or v in keep else (pytest.mark.slow,)
        out.append(pytest.param(*args, marks=marks))
    return out
