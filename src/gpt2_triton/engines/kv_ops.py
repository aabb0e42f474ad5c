"""The few operations the batched KV cache needs, for numpy arrays and torch tensors.

The cache lives where the forward runs: host memory for ONNX Runtime, device memory for
PyTorch on CUDA and TensorRT, so a step never copies it between the two.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class KVOps(Protocol):
    def empty(self, rows: int, heads: int, head_dim: int) -> Any:
        """A (rows, heads, 0, head_dim) cache."""

    def take(self, x: Any, rows: np.ndarray) -> Any:
        """Rows of the batch, in that order."""

    def trim(self, x: Any, first: int) -> Any:
        """Drop the first ``first`` positions (axis 2)."""

    def pad_stack(self, x: Any, y: Any, width: int) -> Any:
        """Stack on the batch axis, each left-padded with zeros to ``width`` positions."""


class NumpyKV:
    def __init__(self, dtype=np.float32) -> None:
        self.dtype = dtype  # the forward's cache type: float16 for an fp16 export

    def empty(self, rows, heads, head_dim):
        return np.zeros((rows, heads, 0, head_dim), self.dtype)

    def take(self, x, rows):
        return x[rows]

    def trim(self, x, first):
        return np.ascontiguousarray(x[:, :, first:])

    def pad_stack(self, x, y, width):
        out = np.zeros((x.shape[0] + y.shape[0], x.shape[1], width, x.shape[3]), x.dtype)
        out[: x.shape[0], :, width - x.shape[2] :] = x
        out[x.shape[0] :, :, width - y.shape[2] :] = y
        return out


class TorchKV:
    def __init__(self, device, dtype) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.dtype = dtype

    def empty(self, rows, heads, head_dim):
        return self.torch.zeros((rows, heads, 0, head_dim), dtype=self.dtype, device=self.device)

    def take(self, x, rows):
        return x.index_select(0, self.torch.as_tensor(rows, device=x.device))

    def trim(self, x, first):
        return x[:, :, first:].contiguous()

    def pad_stack(self, x, y, width):
        out = x.new_zeros((x.shape[0] + y.shape[0], x.shape[1], width, x.shape[3]))
        out[: x.shape[0], :, width - x.shape[2] :] = x
        out[x.shape[0] :, :, width - y.shape[2] :] = y
        return out
