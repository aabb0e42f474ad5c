"""TensorRT forward: serves the plan from ``make engine`` with the same KV-cache contract.

The caches stay on the GPU between steps as torch tensors (``kv_ops``); a step uploads
the new token ids, mask and positions (a few KB) and downloads the last-position logits.
Written against the Python API that TensorRT 10 and 11 share (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). The plan's own tensor types decide the
cache's dtype: fp32 from a TensorRT 10 build (its fp16 is internal), fp16 from TensorRT
11's strongly typed build of the fp16 export.

Streams: ``StatefulEngine`` runs the cache operations (select, trim, pad_stack in
``kv_ops``) on the caller's current stream, and TensorRT runs on a stream of its own (on
the default stream TensorRT adds device-wide synchronisations). The two are ordered both
ways, TensorRT's stream waits for the caller's before it reads a cache and the caller's
waits for TensorRT's before anything reads what it wrote, and every tensor TensorRT
touched is recorded on its stream, so the caching allocator never hands that memory to
another tensor before TensorRT is done with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.trt_profiles import PROFILE_NAMES, profile_for
from gpt2_triton.errors import EngineError

TRT_MISSING = (
    "TensorRT is not installed here. Build and serve the plan inside NVIDIA's Triton image "
    "(docker compose --profile build run --rm build-engine; see docs/GPU.md); on a CPU "
    "machine use ENGINE=onnx"
)
ENGINE_SETTINGS = "engine_settings.json"
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def import_tensorrt():
    """TensorRT's Python module: ``tensorrt`` (the full pip package, NVIDIA's TensorRT
    images) or ``tensorrt_bindings``, the name under which the bindings-only wheel installs;
    docker/Dockerfile adds that wheel for the TensorRT libraries the Triton image carries."""
    try:
        import tensorrt
    except ModuleNotFoundError as missing:
        if missing.name != "tensorrt":  # the package is there, something it imports is not
            raise EngineError(f"TensorRT is installed but cannot load: {missing}") from missing
        try:
            import tensorrt_bindings as tensorrt
        except ModuleNotFoundError:
            raise EngineError(TRT_MISSING) from missing
        except ImportError as exc:  # installed, but its libraries (libnvinfer) do not load
            raise EngineError(f"TensorRT's Python bindings cannot load: {exc}") from exc
    except ImportError as exc:
        raise EngineError(f"TensorRT is installed but cannot load: {exc}") from exc
    return tensorrt


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])


def plan_settings(plan_path: Path, tensorrt_version: str) -> dict:
    """``engine_settings.json`` of a plan this TensorRT can run with these profiles."""
    settings_path = plan_path.with_name(ENGINE_SETTINGS)
    if not plan_path.is_file() or not settings_path.is_file():
        raise EngineError(f"no TensorRT plan at {plan_path}: run 'make engine'")
    settings = json.loads(settings_path.read_text())
    if settings.get("tensorrt_version") != tensorrt_version:
        raise EngineError(
            f"{plan_path} was built with TensorRT {settings.get('tensorrt_version')}, this "
            f"runtime is {tensorrt_version}: a plan only runs on the version that built it; "
            "rebuild it in the serving image (make engine)"
        )
    if tuple(settings.get("profiles", ())) != PROFILE_NAMES:
        raise EngineError(
            f"{plan_path} has the optimization profiles {settings.get('profiles')}, this "
            f"runtime expects {list(PROFILE_NAMES)}: rebuild it (make engine)"
        )
    return settings


class TrtForward:
    name = "trt"

    def __init__(self, plan_path: Path, shape: ModelShape) -> None:
        trt = import_tensorrt()
        import torch

        from gpt2_triton.engines.kv_ops import TorchKV

        if not torch.cuda.is_available():
            raise EngineError("the TensorRT engine needs a CUDA GPU")
        plan_path = Path(plan_path)
        plan_settings(plan_path, trt.__version__)
        self.torch = torch
        self.shape = shape
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {plan_path} (see the log above)")
        if self.engine.num_optimization_profiles != len(PROFILE_NAMES):
            raise EngineError(
                f"{plan_path} holds {self.engine.num_optimization_profiles} optimization "
                f"profiles, {len(PROFILE_NAMES)} expected: rebuild it (make engine)"
            )
        self._past_names = shape.past_names()
        self._output_names = ["logits", *shape.present_names()]
        self.dtypes = _tensor_dtypes(
            self.engine, trt, torch, [*TOKEN_INPUTS, *self._past_names], self._output_names
        )
        # The largest batch every profile takes: the most rows one step may carry.
        self.max_batch = min(
            int(self.engine.get_tensor_profile_shape("input_ids", index)[2][0])
            for index in range(len(PROFILE_NAMES))
        )
        self.device = torch.device("cuda")
        # torch creates its streams non-blocking: no implicit ordering with the default
        # stream, hence the explicit waits in __call__.
        self.stream = torch.cuda.Stream(self.device)
        self.contexts = {}
        for index, name in enumerate(PROFILE_NAMES):
            context = self.engine.create_execution_context()
            if context is None:
                raise EngineError("TensorRT could not create an execution context (GPU memory?)")
            if not context.set_optimization_profile_async(index, self.stream.cuda_stream):
                raise EngineError(f"TensorRT refused optimization profile {index} ({name})")
            self.contexts[name] = context
        self.stream.synchronize()
        self.kv_ops = TorchKV(self.device, self.dtypes[self._past_names[0]])
        # Empty tensors (a prompt's past of length 0) still need a valid address.
        self._placeholder = torch.zeros(1, device=self.device)

    def __call__(self, input_ids, attention_mask, position_ids, past):
        torch = self.torch
        rows, new_tokens = input_ids.shape
        if rows > self.max_batch:
            raise EngineError(
                f"a step of {rows} rows exceeds the largest batch the TensorRT plan was built "
                f"for ({self.max_batch}): rebuild it with make engine MAX_SEQUENCES={rows}"
            )
        profile = profile_for(new_tokens, int(past[0].shape[2]) if past else 0)
        context = self.contexts[profile]
        caller = torch.cuda.current_stream(self.device)
        # Uploads and any cache copy below run on the caller's stream, after the cache
        # operations that built `past`.
        inputs = {
            name: self._upload(name, array)
            for name, array in zip(
                TOKEN_INPUTS, (input_ids, attention_mask, position_ids), strict=True
            )
        }
        for name, cache in zip(self._past_names, past, strict=True):
            if cache.dtype != self.dtypes[name]:
                raise EngineError(f"{name} is {cache.dtype}, the plan takes {self.dtypes[name]}")
            inputs[name] = cache.contiguous()
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(
                    f"TensorRT refused shape {tuple(tensor.shape)} for {name}: outside the "
                    f"plan's {profile} profile"
                )
            self._bind(context, name, tensor)
        outputs = {}
        for name in self._output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise EngineError(f"TensorRT could not infer the shape of {name}: {shape}")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self._bind(context, name, outputs[name])

        self.stream.wait_stream(caller)  # TensorRT reads nothing before it is written
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the log)")
        caller.wait_stream(self.stream)  # nothing reads the outputs before TensorRT wrote them
        for tensor in (*inputs.values(), *outputs.values()):
            if tensor.numel():  # a freed block waits for TensorRT's stream before reuse
                tensor.record_stream(self.stream)
        # On the caller's stream, hence after TensorRT; a copy to pageable host memory
        # returns once done, so no work of this step is in flight after the return.
        logits = outputs["logits"].float().cpu()
        return logits.numpy(), [outputs[n] for n in self._output_names[1:]]

    def _upload(self, name: str, array: np.ndarray):
        wide = self.dtypes[name] == self.torch.int64
        host = np.ascontiguousarray(array, dtype=np.int64 if wide else np.int32)
        return self.torch.from_numpy(host).to(self.device)

    def _bind(self, context, name: str, tensor) -> None:
        address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
        if not context.set_tensor_address(name, address):
            raise EngineError(f"TensorRT refused the buffer address of {name}")


def _tensor_dtypes(engine, trt, torch, inputs: list[str], outputs: list[str]) -> dict:
    """The torch dtype of every I/O tensor, from the plan; refuses a plan whose tensors are
    not the ones (or not of the types) this runtime feeds and reads."""
    to_torch = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    names = {engine.get_tensor_name(i): i for i in range(engine.num_io_tensors)}
    for wanted, mode in ((inputs, trt.TensorIOMode.INPUT), (outputs, trt.TensorIOMode.OUTPUT)):
        for name in wanted:
            if name not in names or engine.get_tensor_mode(name) != mode:
                raise EngineError(
                    f"the plan has no {mode.name.lower()} tensor {name!r}: it was not built "
                    "from this project's export (make engine)"
                )
    dtypes = {}
    for name in (*inputs, *outputs):
        dtype = to_torch.get(engine.get_tensor_dtype(name))
        if dtype is None:
            raise EngineError(f"plan tensor {name} is {engine.get_tensor_dtype(name)}: unsupported")
        dtypes[name] = dtype
    if any(dtypes[n] not in (torch.int64, torch.int32) for n in TOKEN_INPUTS):
        raise EngineError(f"the plan's token inputs must be integers: {dtypes}")
    caches = {dtypes[n] for n in (*inputs, *outputs) if n not in TOKEN_INPUTS and n != "logits"}
    if len(caches) != 1 or not caches <= {torch.float16, torch.float32}:
        raise EngineError(f"the plan's KV-cache tensors must share one float type, got {caches}")
    if dtypes["logits"] not in (torch.float16, torch.float32):
        raise EngineError(f"the plan's logits are {dtypes['logits']}: a float type expected")
    return dtypes
