"""Small copies between the host and a torch device that do not wait for the device.

A plain ``tensor.to("cuda")`` from host memory, or ``.cpu()`` of a device tensor, waits
for everything queued on the stream first. With decoding ahead (``SlotEngine.step_ahead``)
the stream holds the next decode step, and such a wait would put the host back behind
it. These go through pinned memory instead: an upload is queued and returns; a download
is queued with an event, and its reader waits for that copy alone. PyTorch's pinned
allocator keeps a block until the copy queued from it has run. On the CPU they are
plain copies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def to_device_without_wait(values, device):
    """A small host array (or list) on ``device``; integers as int64."""
    import torch

    array = np.asarray(values)
    if array.dtype.kind in "iu":
        array = array.astype(np.int64, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor.clone()  # never the caller's memory
    if device.type != "cuda":  # another accelerator: a plain copy
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host_later(tensor) -> Callable[[], np.ndarray]:
    """Queue ``tensor``'s copy to the host; returns the function that waits for that copy
    alone (not for what is queued after it) and gives it as numpy."""
    import torch

    if tensor.device.type != "cuda":
        copied = tensor.numpy().copy()
        return lambda: copied
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))

    def read() -> np.ndarray:
        done.synchronize()
        return host.numpy().copy()

    return read
