"""``make engine``: ONNX -> TensorRT plan, FP16 with GPT-2's overflow-prone layers in FP32.

    python -m build_scripts.build_engine --model gpt2 [--precision fp16|fp32]

How fp16 is asked for depends on the installed TensorRT (``build_mode``):
- TensorRT 10 builds ``model.onnx`` (fp32) with the FP16 builder flag, LayerNorm and
  softmax pinned to FP32 and OBEY_PRECISION_CONSTRAINTS;
- TensorRT 11 and later are strongly typed only (those flags are gone): the precision is
  the graph's own, so they build ``model.fp16.onnx``, the fp16 export whose LayerNorm and
  softmax run in fp32 between explicit Cast nodes (``export_onnx --fp16``).

The plan and its export live in ``artifacts/trt/<model>/`` (``export_onnx --tensorrt``), apart
from ONNX Runtime's export, which an export at another opset would replace whole.

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

from build_scripts.export_onnx import FP16_FILE, SOURCE_FINGERPRINT, check_current, trt_dir
from gpt2_triton import checkpoint, fingerprint, logs
from gpt2_triton.atomic import write_json
from gpt2_triton.cli import run_step
from gpt2_triton.engines.factory import read_shape
from gpt2_triton.engines.trt_forward import ENGINE_SETTINGS, import_tensorrt, tensorrt_major
from gpt2_triton.engines.trt_profiles import optimization_profiles
from gpt2_triton.errors import EngineError

log = logging.getLogger("build_scripts.build_engine")

PLAN = "model.plan"
TIMING_CACHE = "timing.cache"
FP32_ONNX = "model.onnx"
FP16_ONNX = FP16_FILE
# Keys in engine_settings.json: what the plan was built from.
ONNX_FINGERPRINT = "onnx_fingerprint"
ONNX_FILE = "onnx_file"
# The first TensorRT that is strongly typed only: no FP16 / OBEY_PRECISION_CONSTRAINTS flags.
TRT_STRONGLY_TYPED = 11


@dataclass(frozen=True)
class BuildMode:
    """How one TensorRT version builds one precision."""

    onnx_file: str  # the export TensorRT parses
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag to set
    pin_fp32_layers: bool  # mark LayerNorm / softmax FP32 (a weakly typed network only)


def build_mode(tensorrt_version: str, precision: str) -> BuildMode:
    """TensorRT 10: the fp32 graph, fp16 by builder flags with GPT-2's overflow-prone layers
    pinned to fp32. TensorRT 11+: the graph's own types (strongly typed), so fp16 comes from
    the fp16 export, whose casts keep LayerNorm and softmax in fp32."""
    if tensorrt_major(tensorrt_version) >= TRT_STRONGLY_TYPED:
        return BuildMode(FP16_ONNX if precision == "fp16" else FP32_ONNX, (), False)
    if precision == "fp16":
        return BuildMode(FP32_ONNX, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True)
    return BuildMode(FP32_ONNX, (), False)


def set_builder_flags(config, trt, mode: BuildMode) -> None:
    """Set the mode's flags, and only those: TensorRT 11 no longer has FP16 or
    OBEY_PRECISION_CONSTRAINTS, so naming them there fails before anything is built."""
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))


def onnx_files(onnx_file: str) -> tuple[str, str]:
    """The graph and its external weights (``save_model`` writes them side by side)."""
    return onnx_file, f"{onnx_file}.data"


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
    pow / reduce / sqrt when it arrives decomposed) and softmax. Returns how many.

    TensorRT 10's weakly typed networks only: layer precisions and output types are
    requests there; TensorRT 11 has neither (the fp16 export's casts do this job)."""
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
            f"{'.'.join(map(str, TRT_FUSED_ATTENTION))}+): export it again at opset 18 with "
            "'make engine ENGINE_OPSET=18' (a plain 'make engine' keeps the export's opset)"
        )


def onnx_fingerprint(export_dir: Path, onnx_file: str = FP32_ONNX) -> dict:
    return fingerprint.of_files(export_dir, onnx_files(onnx_file))


def plan_stale_reason(export_dir: Path) -> str | None:
    """Why ``model.plan`` in ``export_dir`` is not a build of the ONNX files beside it:
    ``""`` when it is, ``None`` when its settings record no ONNX fingerprint (a plan from
    before fingerprints were kept: cannot tell)."""
    settings_path = export_dir / ENGINE_SETTINGS
    if not (export_dir / PLAN).is_file() or not settings_path.is_file():
        return f"no {PLAN} in {export_dir}"
    settings = json.loads(settings_path.read_text())
    recorded = settings.get(ONNX_FINGERPRINT)
    if recorded is None:
        return None
    onnx_file = _parsed_file(settings)
    if not all((export_dir / name).is_file() for name in onnx_files(onnx_file)):
        return f"its {onnx_file} is gone"
    return fingerprint.difference(recorded, onnx_fingerprint(export_dir, onnx_file))


def _parsed_file(settings: dict) -> str:
    return settings.get(ONNX_FILE, FP32_ONNX)  # plans from before the fp16 export: fp32


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
        settings_path = export_dir / ENGINE_SETTINGS
        parsed = (
            _parsed_file(json.loads(settings_path.read_text()))
            if settings_path.is_file()
            else FP32_ONNX
        )
        raise EngineError(
            f"{export_dir / PLAN} was built from another {parsed} ({reason}): "
            "rebuild it with 'make engine'"
        )


def build(export_dir: Path, settings: EngineSettings) -> Path:
    trt = import_tensorrt()
    check_opset(export_dir, trt.__version__)
    exported = check_current(export_dir, "re-export it first ('make engine' does)")
    mode = build_mode(trt.__version__, settings.precision)
    if mode.onnx_file not in exported.get("files", {}).values():
        raise EngineError(
            f"TensorRT {trt.__version__} builds a {settings.precision} plan from "
            f"{mode.onnx_file}, which {export_dir} does not hold: export it with --fp16 "
            "(make engine does for PRECISION=fp16)"
        )
    shape = read_shape(export_dir)
    onnx_path = export_dir / mode.onnx_file
    # Hashed before parsing: what the record says is what TensorRT read.
    parsed = onnx_fingerprint(export_dir, mode.onnx_file)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # No creation flags: explicit batch is the only mode since TensorRT 10, and from 11 on
    # every network is strongly typed (the STRONGLY_TYPED flag is kept there but ignored).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_gib << 30)
    set_builder_flags(config, trt, mode)
    pinned = keep_in_fp32(network, trt) if mode.pin_fp32_layers else 0
    profiles = optimization_profiles(shape, settings.max_batch)
    for ranges in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in ranges.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache_path = export_dir / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # another GPU's or TensorRT's (a shared artifacts folder): its timings would not
        # hold here; a new cache, written over it after the build
        log.warning("%s is from another GPU or TensorRT: building without it", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    log.info(
        "building a %s plan from %s with TensorRT %s (%d layers pinned to fp32)",
        settings.precision,
        mode.onnx_file,
        trt.__version__,
        pinned,
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT could not build the plan (see the log above)")
    tmp = export_dir / f".{PLAN}.partial"
    tmp.write_bytes(bytes(plan))
    # The settings go before the plan is replaced and come back after: a build stopped in
    # between leaves a plan without settings, which make repo refuses (not the new plan
    # described by the old settings: another max_batch or precision).
    (export_dir / ENGINE_SETTINGS).unlink(missing_ok=True)
    tmp.replace(export_dir / PLAN)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_json(
        export_dir / ENGINE_SETTINGS,
        {
            "tensorrt_version": trt.__version__,
            ONNX_FILE: mode.onnx_file,
            ONNX_FINGERPRINT: parsed,
            SOURCE_FINGERPRINT: exported.get(SOURCE_FINGERPRINT),  # the checkpoint's
            "precision": settings.precision,
            # TensorRT 10: layers pinned by the builder; 11+: fp32 by the graph's casts
            "layers_pinned_fp32": pinned,
            "strongly_typed": tensorrt_major(trt.__version__) >= TRT_STRONGLY_TYPED,
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
    parser.add_argument(
        "--export-dir", type=Path, help="default: artifacts/trt/<model> (export_onnx --tensorrt)"
    )
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument(
        "--max-batch",
        type=int,
        default=EngineSettings.max_batch,
        help="largest batch (the repository's MAX_SEQUENCES)",
    )
    parser.add_argument("--workspace-gib", type=int, default=EngineSettings.workspace_gib)
    parser.add_argument(
        "--check",
        action="store_true",
        help="only whether TensorRT loads here (make engine asks before its export)",
    )
    args = parser.parse_args(argv)
    logs.setup()

    def step() -> str:
        trt = import_tensorrt()  # first: without TensorRT nothing else matters
        if args.check:
            return f"TensorRT {trt.__version__} loads"
        settings = EngineSettings(args.precision, args.max_batch, args.workspace_gib)
        export_dir = args.export_dir or trt_dir(checkpoint.resolve(args.model).slug)
        return f"TensorRT plan in {build(export_dir, settings)}"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
