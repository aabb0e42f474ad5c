"""Build an engine by name from an export folder: the one place that knows the kinds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.slots import SlotEngine
from gpt2_triton.engines.stateful import StatefulEngine
from gpt2_triton.errors import EngineError

# kind -> what it runs; "torch" runs the checkpoint itself, the others an exported file.
ENGINE_KINDS = ("onnx", "onnx-int8", "torch", "trt")
# the KV cache written in place (slots.py): ONNX Runtime's rewritten graph (onnx_slots.py),
# PyTorch's static cache with CUDA graphs (torch_slots.py)
IN_PLACE_KINDS = ("onnx", "onnx-int8", "torch")
SETTINGS_FILE = "export_settings.json"

log = logging.getLogger(__name__)


def takes_prompt_chunks(kind: str) -> bool:
    """Whether engine ``kind`` runs several new tokens on a non-empty cache (a prompt's
    later chunks, for chunked prefill). A TensorRT plan does not: its profiles take prompts
    on an empty cache and one-token steps (trt_profiles.py)."""
    return kind != "trt"


def read_shape(export_dir: Path) -> ModelShape:
    path = Path(export_dir) / SETTINGS_FILE
    if not path.is_file():
        raise EngineError(f"no {SETTINGS_FILE} in {export_dir}: run 'make export' first")
    return ModelShape.from_dict(json.loads(path.read_text())["shape"])


def _takes_in_place_cache(export_dir: Path, shape: ModelShape) -> bool:
    """An export at opset 23 (the default) has the fused ``Attention`` nodes the in-place
    cache rewrites, and ONNX Runtime's kernel for it wants head sizes that are multiples
    of 8 (GPT-2's is 64); anything else (``make export OPSET=18``, for TensorRT before
    10.14) runs on the padded cache."""
    from gpt2_triton.export import FUSED_ATTENTION_OPSET

    settings = json.loads((Path(export_dir) / SETTINGS_FILE).read_text())
    opset = settings.get("opset") or 0
    if opset >= FUSED_ATTENTION_OPSET and shape.head_dim % 8 == 0:
        return True
    # Not an error (a TensorRT-era export is served this way), but slower at every batch
    # size above one: say so, with what to do if it was not meant.
    why = (
        f"head size {shape.head_dim} is not a multiple of 8"
        if opset >= FUSED_ATTENTION_OPSET
        else f"{export_dir / SETTINGS_FILE} names opset {opset or 'none'}, not "
        f">= {FUSED_ATTENTION_OPSET} (if the export has it, render the repository again: "
        "'make repo')"
    )
    log.warning("the KV cache is padded, not written in place: %s", why)
    return False


def _onnx_file(kind: str, export_dir: Path) -> Path:
    if kind == "onnx":
        return export_dir / "model.onnx"
    path = export_dir / "model.int8.onnx"
    if not path.is_file():
        raise EngineError(f"{path} not found: export with --int8 (make export INT8=1)")
    return path


def _torch_model(export_dir: Path, model, threads: int, device: str):
    """The checkpoint a torch engine runs (``model``, or the repository's
    ``engine/1/checkpoint``), with torch's threads and device checked."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device} asked for, but PyTorch sees no CUDA GPU")
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export_dir / "checkpoint").eval()
    return model


def build_forward(
    kind: str,
    export_dir: Path,
    shape: ModelShape,
    *,
    threads: int = 0,
    device: str = "cpu",
    model=None,
):
    """The forward function of engine ``kind`` on the padded batch (``StatefulEngine``).

    ``model`` (a loaded ``GPT2LMHeadModel``) is needed by ``torch`` only; ``device``
    ``cuda`` runs it in fp16.
    """
    export_dir = Path(export_dir)
    if kind in ("onnx", "onnx-int8"):
        from gpt2_triton.engines.onnx_forward import OnnxForward

        return OnnxForward(_onnx_file(kind, export_dir), shape, threads)
    if kind == "torch":
        import torch

        from gpt2_triton.engines.torch_forward import TorchForward

        model = _torch_model(export_dir, model, threads, device)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        return TorchForward(model, shape, device=device, dtype=dtype)
    if kind == "trt":
        from gpt2_triton.engines.trt_forward import TrtForward

        return TrtForward(export_dir / "model.plan", shape)
    raise EngineError(f"unknown engine kind {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")


def build_engine(
    kind: str,
    export_dir: Path,
    *,
    max_sequences: int = 64,
    in_place: bool = True,
    cuda_graphs: bool | None = None,
    compile_decode: bool = False,
    static_decode: bool | None = None,
    **kwargs,
) -> StatefulEngine | SlotEngine:
    """The serving engine of ``kind``. ONNX Runtime and PyTorch engines write the KV cache
    in place (``SlotEngine``) unless ``in_place`` is False (``StatefulEngine``'s padded
    batch, what TensorRT uses). ``cuda_graphs`` (torch only): capture decode steps, by
    default wherever the device is CUDA; ``compile_decode`` (torch with graphs): their
    layer code through torch.compile; ``static_decode`` (torch): decode steps through the
    graphs' static inputs without capturing (what decoding ahead needs on the CPU)."""
    shape = read_shape(export_dir)
    if in_place and kind == "torch":
        device = kwargs.get("device", "cpu")
        model = _torch_model(
            Path(export_dir), kwargs.get("model"), kwargs.get("threads", 0), device
        )
        return torch_slot_engine(
            model, shape, device, max_sequences,
            cuda_graphs=cuda_graphs, compile_decode=compile_decode, static_decode=static_decode,
        )  # fmt: skip
    if in_place and kind in IN_PLACE_KINDS and _takes_in_place_cache(export_dir, shape):
        from gpt2_triton.engines.onnx_slots import OnnxSlotForward

        threads = kwargs.get("threads", 0)
        forward = OnnxSlotForward(_onnx_file(kind, Path(export_dir)), shape, threads)
        return SlotEngine(forward, shape, max_sequences)
    return StatefulEngine(build_forward(kind, export_dir, shape, **kwargs), shape, max_sequences)


def torch_slot_engine(model, shape: ModelShape, device: str, max_sequences: int, **options):
    """The torch serving engine over a loaded ``GPT2LMHeadModel`` (``options``: those of
    ``TorchSlotForward``), its CUDA graphs captured now, at load, not in a stream's first
    steps."""
    from gpt2_triton.engines.torch_slots import TorchSlotForward

    forward = TorchSlotForward(model, shape, device, **options)
    forward.capture_graphs(max_sequences)
    return SlotEngine(forward, shape, max_sequences)


def build_engine_from_params(
    params, export_dir: Path, model: str, max_sequences: int
) -> StatefulEngine:
    """The engine a Triton model's ``config.pbtxt`` asks for (``engine_kind``,
    ``engine_threads``, ``device``, ``cuda_graphs``, ``torch_compile``): the same reading for
    every model that holds one."""
    from gpt2_triton import model_config

    device = params.get("device") or "cpu"
    graphs = model_config.int_param(params, "cuda_graphs", model) if "cuda_graphs" in params else 1
    compiled = "torch_compile" in params and model_config.int_param(params, "torch_compile", model)
    # decoding ahead runs through the static decode steps (on the CPU too: the tests' path)
    ahead = "decode_ahead" in params and model_config.int_param(params, "decode_ahead", model)
    return build_engine(
        model_config.require(params, "engine_kind", model),
        export_dir,
        max_sequences=max_sequences,
        threads=model_config.int_param(params, "engine_threads", model),
        device=device,
        cuda_graphs=bool(graphs) and device.startswith("cuda"),
        compile_decode=bool(compiled),
        static_decode=True if ahead else None,
    )
