"""Engines: one stateful KV-cache contract, several ways to run the GPT-2 forward pass.

``StatefulEngine`` owns the per-sequence KV caches and batching; a *forward* function
(ONNX Runtime, PyTorch, TensorRT) only maps ``(input_ids, attention_mask, position_ids,
past)`` to ``(last-position logits, present)``. Every forward takes and returns numpy
arrays laid out like the ONNX export (see ``docs/ARCHITECTURE.md``).
"""

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.stateful import StatefulEngine

__all__ = ["ModelShape", "StatefulEngine"]
