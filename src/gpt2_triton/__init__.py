"""Shared core of the GPT-2 on Triton project.

Everything here is plain Python (numpy, tokenizers, ONNX Runtime, PyTorch): no module imports
``triton_python_backend_utils``, so the whole core is unit-tested without a server. The
Triton models in ``model_repository/`` are thin adapters over it.
"""

__version__ = "0.1.0"
