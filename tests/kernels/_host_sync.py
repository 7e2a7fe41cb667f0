"""Catch host syncs at the Python level: the torch calls that read device values on the host.

On a CPU-only machine nothing really syncs, but the same calls would sync (and break CUDA-graph
capture) on CUDA; a TorchFunctionMode sees them whatever the device.
"""
from torch.overrides import TorchFunctionMode

# Tensor methods / torch functions that copy device data to the host, or whose output shape
# depends on the data (also a sync on CUDA).
SYNC_CALLS = {
    "tolist", "item", "__bool__", "__int__", "__index__", "__float__", "numpy", "cpu",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
    "repeat_interleave", "_local_scalar_dense",
}


class HostSyncRecorder(TorchFunctionMode):
    """``with HostSyncRecorder() as rec: ...``; then ``rec.calls`` lists the sync calls seen."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNC_CALLS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
