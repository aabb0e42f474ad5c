"""``make engine``: ONNX -> TensorRT plan, FP16 with GPT-2's overflow-prone layers in FP32.

    python -m build_scripts.build_engine --model gpt2 [--precision fp16|fp32]

Run it inside the image that serves the plan (docker compose --profile build run --rm
build-engine): a plan only runs on the TensorRT version that built it, which is stamped
into ``engine_settings.json`` next to ``model.plan`` and checked at load time. Without
TensorRT: one clear message and exit code 2.

``engine_settings.json`` also records the sha256 of the ``model.onnx`` (and its weights
file) the plan was parsed from: ``check_plan`` refuses a plan whose ONNX files have changed
since (``make repo ENGINE=trt`` and ``make verify`` call it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from build_scripts.export_onnx import SOURCE_FINGERPRINT, check_current
from gpt2_triton import checkpoint, fingerprint, logs
from gpt2_triton.atomic import write_json
from gpt2_triton.cli import run_step
from gpt2_triton.engines.factory import read_shape
from gpt2_triton.engines.trt_forward import ENGINE_SETTINGS, import_tensorrt
from gpt2_triton.engines.trt_profiles import optimization_profiles
from gpt2_triton.errors import EngineError

log = logging.getLogger("build_scripts.build_engine")

PLAN = "model.plan"
TIMING_CACHE = "timing.cache"
ONNX_FILES = ("model.onnx", "model.onnx.data")  # the graph and its external weights
# Keys in engine_settings.json: what the plan was built from.
ONNX_FINGERPRINT = "onnx_fingerprint"


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp16"  # fp16 (overflow-prone layers kept fp32) or fp32
    max_batch: int = 16  # = MAX_SEQUENCES of the model repository
    workspace_gib: int = 4

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise EngineError(f"--precision must be fp16 or fp32, got {self.precision}")
        if self.max_batch < 1 or self.workspace_gib < 1:
            raise EngineError("--max-batch and --workspace-gib must be >= 1")


def keep_in_fp32(network, trt) -> int:
    """Pin the layers that overflow in FP16 in GPT-2 to FP32: LayerNorm (and its
    pow / reduce / sqrt when it arrives decomposed) and softmax. Returns how many."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        kind = layer.type
        risky = kind in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)
        if kind == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # the Python API's down-cast
            risky = layer.op == trt.ElementWiseOperation.POW
        elif kind == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            risky = layer.op == trt.UnaryOperation.SQRT
        if not risky:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in (trt.float32, trt.float16):
                layer.set_output_type(output, trt.float32)
        pinned += 1
    return pinned


# The first TensorRT whose ONNX parser reads the opset-23 Attention node.
TRT_FUSED_ATTENTION = (10, 14)


def check_opset(export_dir: Path, tensorrt_version: str) -> None:
    """Fail before parsing when the export holds Attention nodes this TensorRT cannot read."""
    from build_scripts.export_onnx import load_settings
    from gpt2_triton.export import FUSED_ATTENTION_OPSET

    opset = int(load_settings(export_dir).get("opset", 0))
    version = tuple(int(part) for part in tensorrt_version.split(".")[:2])
    if opset >= FUSED_ATTENTION_OPSET and version < TRT_FUSED_ATTENTION:
        raise EngineError(
            f"{export_dir} is an opset-{opset} export (fused Attention nodes), which TensorRT "
            f"{tensorrt_version} cannot parse (needs "
            f"{'.'.join(map(str, TRT_FUSED_ATTENTION))}+): re-export with --opset 18 "
            "(make engine does: ENGINE_OPSET=18)"
        )


def onnx_fingerprint(export_dir: Path) -> dict:
    return fingerprint.of_files(export_dir, ONNX_FILES)


def plan_stale_reason(export_dir: Path) -> str | None:
    """Why ``model.plan`` in ``export_dir`` is not a build of the ONNX files beside it:
    ``""`` when it is, ``None`` when its settings record no ONNX fingerprint (a plan from
    before fingerprints were kept: cannot tell)."""
    settings_path = export_dir / ENGINE_SETTINGS
    if not (export_dir / PLAN).is_file() or not settings_path.is_file():
        return f"no {PLAN} in {export_dir}"
    recorded = json.loads(settings_path.read_text()).get(ONNX_FINGERPRINT)
    if recorded is None:
        return None
    return fingerprint.difference(recorded, onnx_fingerprint(export_dir))


def check_plan(export_dir: Path) -> None:
    """Refuse a plan built from other ONNX files than those in ``export_dir`` now."""
    reason = plan_stale_reason(export_dir)
    if reason is None:
        log.warning(
            "%s records no fingerprint of the ONNX it was built from: to be sure, run "
            "'make engine'",
            export_dir / PLAN,
        )
    elif reason:
        raise EngineError(
            f"{export_dir / PLAN} was built from another model.onnx ({reason}): "
            "rebuild it with 'make engine'"
        )


def build(export_dir: Path, settings: EngineSettings) -> Path:
    trt = import_tensorrt()
    check_opset(export_dir, trt.__version__)
    exported = check_current(export_dir, "re-export it first ('make engine' does)")
    shape = read_shape(export_dir)
    onnx_path = export_dir / "model.onnx"
    # Hashed before parsing: what the record says is what TensorRT read.
    parsed = onnx_fingerprint(export_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_gib << 30)
    pinned = 0
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = keep_in_fp32(network, trt)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profiles = optimization_profiles(shape, settings.max_batch)
    for ranges in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in ranges.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache_path = export_dir / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building %s plan (%d layers pinned to fp32)", settings.precision, pinned)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT could not build the plan (see the log above)")
    tmp = export_dir / f".{PLAN}.partial"
    tmp.write_bytes(bytes(plan))
    tmp.replace(export_dir / PLAN)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_json(
        export_dir / ENGINE_SETTINGS,
        {
            "tensorrt_version": trt.__version__,
            ONNX_FINGERPRINT: parsed,
            SOURCE_FINGERPRINT: exported.get(SOURCE_FINGERPRINT),  # the checkpoint's
            "precision": settings.precision,
            "layers_pinned_fp32": pinned,
            "max_batch": settings.max_batch,
            "profiles": list(profiles),  # order = profile index
            "profile_ranges": {
                k: {n: list(map(list, r)) for n, r in v.items()} for k, v in profiles.items()
            },
            "gpu": _gpu_name(),
        },
    )
    return export_dir / PLAN


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="hub id, 'tiny' or checkpoint folder")
    parser.add_argument("--export-dir", type=Path, help="default: artifacts/onnx/<model>")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument(
        "--max-batch",
        type=int,
        default=EngineSettings.max_batch,
        help="largest batch (the repository's MAX_SEQUENCES)",
    )
    parser.add_argument("--workspace-gib", type=int, default=EngineSettings.workspace_gib)
    args = parser.parse_args(argv)
    logs.setup()

    def step() -> str:
        import_tensorrt()  # first: without TensorRT nothing else matters
        settings = EngineSettings(args.precision, args.max_batch, args.workspace_gib)
        export_dir = args.export_dir or (
            checkpoint.artifacts_root() / "onnx" / checkpoint.resolve(args.model).slug
        )
        return f"TensorRT plan in {build(export_dir, settings)}"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
