"""TensorRT forward: serves the plan from ``make engine`` with the same KV-cache contract.

The caches stay on the GPU between steps as torch tensors (``kv_ops``); a step uploads
the new token ids, mask and positions (a few KB) and downloads the last-position logits.
Written against TensorRT 10's Python API (``execute_async_v3`` with tensor addresses).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.trt_profiles import profile_for
from gpt2_triton.errors import EngineError

TRT_MISSING = (
    "TensorRT is not installed here. Build and serve the plan inside NVIDIA's Triton image "
    "(docker compose --profile build run --rm build-engine; see docs/GPU.md); on a CPU "
    "machine use ENGINE=onnx"
)
ENGINE_SETTINGS = "engine_settings.json"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(TRT_MISSING) from exc
    return tensorrt


class TrtForward:
    name = "trt"

    def __init__(self, plan_path: Path, shape: ModelShape) -> None:
        trt = import_tensorrt()
        import torch

        from gpt2_triton.engines.kv_ops import TorchKV

        if not torch.cuda.is_available():
            raise EngineError("the TensorRT engine needs a CUDA GPU")
        plan_path = Path(plan_path)
        settings_path = plan_path.with_name(ENGINE_SETTINGS)
        if not plan_path.is_file() or not settings_path.is_file():
            raise EngineError(f"no TensorRT plan at {plan_path}: run 'make engine'")
        settings = json.loads(settings_path.read_text())
        if settings["tensorrt_version"] != trt.__version__:
            raise EngineError(
                f"{plan_path} was built with TensorRT {settings['tensorrt_version']}, this "
                f"runtime is {trt.__version__}: a plan only runs on the version that built it; "
                "rebuild it in the serving image (make engine)"
            )
        self.torch = torch
        self.shape = shape
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {plan_path}")
        self.stream = torch.cuda.Stream()
        self.contexts = {}
        for index, name in enumerate(settings["profiles"]):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[name] = context
        self.stream.synchronize()
        self.device = torch.device("cuda")
        self.kv_ops = TorchKV(self.device, torch.float32)
        # Empty tensors (a prompt's past of length 0) still need a valid address.
        self._placeholder = torch.zeros(1, device=self.device)
        self._past_names = shape.past_names()
        self._output_names = ["logits", *shape.present_names()]

    def __call__(self, input_ids, attention_mask, position_ids, past):
        torch = self.torch
        context = self.contexts[profile_for(input_ids.shape[1])]

        def upload(array: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

        with torch.cuda.stream(self.stream):
            inputs = {
                "input_ids": upload(input_ids),
                "attention_mask": upload(attention_mask),
                "position_ids": upload(position_ids),
            }
            inputs.update((n, p.contiguous()) for n, p in zip(self._past_names, past, strict=True))
            for name, tensor in inputs.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, self._address(tensor))
            outputs = {}
            for name in self._output_names:
                out = torch.empty(
                    tuple(context.get_tensor_shape(name)), dtype=torch.float32, device=self.device
                )
                context.set_tensor_address(name, self._address(out))
                outputs[name] = out
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            logits = outputs["logits"].to("cpu", non_blocking=False)
        self.stream.synchronize()
        return logits.numpy(), [outputs[n] for n in self._output_names[1:]]

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
