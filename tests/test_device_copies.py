"""``device_copies.py`` on the devices this machine has (the CPU, and ``meta`` standing in
for an accelerator other than CUDA); the pinned CUDA path runs in ``gpu_bench.sh``."""

from __future__ import annotations

import numpy as np
import torch

from gpt2_triton.device_copies import to_device_without_wait, to_host_later


def test_uploads_keep_their_device_make_integers_int64_and_never_alias():
    source = np.array([3, 1, 2], np.int32)
    on_cpu = to_device_without_wait(source, torch.device("cpu"))
    assert on_cpu.dtype == torch.int64 and on_cpu.tolist() == [3, 1, 2]
    table = np.array([[0.5, 2.0]])
    copied = to_device_without_wait(table, torch.device("cpu"))
    table[0, 0] = 9.0
    assert copied.dtype == torch.float64 and copied[0, 0] == 0.5  # not the caller's memory
    elsewhere = to_device_without_wait([4, 5], torch.device("meta"))
    assert elsewhere.device.type == "meta" and elsewhere.dtype == torch.int64


def test_a_download_read_later_is_what_the_tensor_held():
    tensor = torch.tensor([7, 8])
    read = to_host_later(tensor)
    tensor[0] = 0
    assert read().tolist() == [7, 8]
