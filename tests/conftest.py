"""Test setup shared by the whole suite.

Without a CUDA GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
triton.jit decorates anything, so it is set here, before detcompile is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import detcompile  # noqa: E402,F401  (registers the detcompile ops)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # slow tests run when selected (-m "...slow...") or with DETCOMPILE_RUN_SLOW=1: the default run stays fast
    run_slow = "slow" in (config.getoption("-m") or "") or os.environ.get("DETCOMPILE_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: select with -m slow or DETCOMPILE_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh random data per test, reproducible across runs."""
    return torch.Generator().manual_seed(1234)
