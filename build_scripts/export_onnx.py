"""``make export``: checkpoint -> ``artifacts/onnx/<model>/`` (model.onnx + settings + tokenizer).

    python -m build_scripts.export_onnx --model tiny [--int8] [--fp16] [--tensorrt]

The folder is written all at once; it holds ``model.onnx`` (its weights in
``model.onnx.data``), optionally ``model.int8.onnx`` (``model.int8.onnx.data``) and
``model.fp16.onnx`` (fp16 with LayerNorm and softmax in fp32: what TensorRT 11 builds from),
``export_settings.json`` (what was built, from what, with which versions, and the
sha256 of the checkpoint files it was built from) and
``tokenizer/``. Later steps (verify, make repo) read only this folder.

``--tensorrt`` writes the export TensorRT builds from into a folder of its own,
``artifacts/trt/<model>/`` (opset 18 unless ``--opset`` says otherwise), where ``make
engine`` puts the plan beside it. Apart, because an export replaces its whole folder: an
ONNX Runtime export at its own opset (``make repo``, ``make verify``) would otherwise delete
the plan.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from gpt2_triton import checkpoint, fingerprint, logs
from gpt2_triton.atomic import atomic_dir, write_json
from gpt2_triton.cli import run_step
from gpt2_triton.engines.factory import SETTINGS_FILE
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import ExportError, Gpt2TritonError
from gpt2_triton.fingerprint import SOURCE_FINGERPRINT  # what the other steps import here

log = logging.getLogger("build_scripts.export_onnx")

# The opset TensorRT's export is written at: 23's fused Attention node keeps its softmax
# without the Cast that holds it in fp32 (and TensorRT parses it only from 10.14 on).
TENSORRT_OPSET = 18


def onnx_dir(slug: str) -> Path:
    """ONNX Runtime's export (``make export``, ``make repo ENGINE=onnx``)."""
    return checkpoint.artifacts_root() / "onnx" / slug


def trt_dir(slug: str) -> Path:
    """TensorRT's: the export a plan is built from, and the plan (``make engine``)."""
    return checkpoint.artifacts_root() / "trt" / slug


def stale_reason(
    folder: Path,
    source: str,
    int8: bool,
    opset: int,
    weights: dict | None,
    fp16: bool = False,
) -> str:
    """Why ``folder`` is not an export of ``source`` as it is now (``""`` when it is).

    ``weights`` is the checkpoint's content fingerprint today: the same path may hold other
    weights since the export (a second training run into the same folder).
    """
    from gpt2_triton.export import INT8_FORMAT, weights_file

    try:
        settings = load_settings(folder)
    except Gpt2TritonError:
        return "no export yet"
    files = [folder / name for name in settings.get("files", {}).values()]
    if not is_export_of(settings, source, weights):
        return f"it was exported from {settings.get('model')}"
    if settings.get("opset") != opset:
        return f"it is an opset-{settings.get('opset')} export, opset {opset} is asked for"
    if int8 and "int8" not in settings.get("files", {}):
        return "it has no int8 model"
    if fp16 and "fp16" not in settings.get("files", {}):
        return "it has no fp16 model"
    if not all(f.is_file() and weights_file(f).is_file() for f in files):
        return "some of its files are missing"
    if not (folder / "tokenizer" / "tokenizer_config.json").is_file():
        return "its tokenizer is missing"
    if weights is None:
        return "the checkpoint is not in the local cache: cannot tell whether it changed"
    changed = fingerprint.difference(settings.get(SOURCE_FINGERPRINT), weights)
    if changed:
        return f"the checkpoint's {changed}"
    # last: the one reason that leaves every other file of the export as it is (run())
    if int8 and settings.get("int8_format", 1) != INT8_FORMAT:
        return f"{OLDER_INT8} {settings.get('int8_format', 1)}, not {INT8_FORMAT}"
    return ""


OLDER_INT8 = "its int8 model is of format"  # stale_reason's reason that run() mends in place


def is_export_of(settings: dict, source: str, weights: dict | None) -> bool:
    """Whether an export (its ``settings``) serves checkpoint ``source``, whose content
    fingerprint today is ``weights``: made from that folder (or hub id), or from another
    holding the very same content (a copy, the checkout mounted at another path)."""
    if checkpoint.same_checkpoint(settings.get("model"), source):
        return True
    recorded = settings.get(SOURCE_FINGERPRINT)
    return bool(recorded and weights) and not fingerprint.difference(recorded, weights)


def check_current(export_dir: Path, how: str, spec: checkpoint.ModelSpec | None = None) -> dict:
    """Fail when ``export_dir`` is not an export of ``spec`` (when given: a folder named by
    hand, or one of an older layout that named exports by the folder's name alone), or when
    the checkpoint it was made from now holds other content (it was trained again, or
    rebuilt), naming the changed files and ``how`` to re-export. Returns the export's
    settings.

    An export from before fingerprints were kept, or whose checkpoint is not here (gone, a
    hub id not cached), cannot be checked: that is logged, not fatal.
    """
    settings = load_settings(export_dir)
    recorded = settings.get(SOURCE_FINGERPRINT)
    source = settings.get("model", "?")
    try:
        current = checkpoint.fingerprint(spec or checkpoint.resolve(source))
    except Gpt2TritonError as exc:
        current = None
        log.info("cannot check %s against its checkpoint: %s", export_dir, exc)
    changed = fingerprint.difference(recorded, current) if recorded and current else ""
    if spec is not None and not is_export_of(settings, spec.source, current):
        raise ExportError(f"{export_dir} holds an export of {source}, not of {spec.source}; {how}")
    if recorded is None:
        log.warning("%s records no fingerprint of %s: to be sure, %s", export_dir, source, how)
    elif changed:
        name = spec.source if spec else source
        raise ExportError(f"{export_dir} is out of date: {name}'s {changed}; {how}")
    return settings


def run(
    model_spec: str,
    output: Path | None = None,
    int8: bool = False,
    skip_existing: bool = False,
    opset: int | None = None,
    fp16: bool = False,
    tensorrt: bool = False,
) -> Path:
    """Export ``model_spec`` into ``output``, by default ONNX Runtime's folder or, with
    ``tensorrt``, TensorRT's (whose opset is then ``TENSORRT_OPSET`` unless given)."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    from gpt2_triton.export import (
        INT8_FORMAT,
        MIN_OPSET,
        OPSET,
        export_fp16,
        export_onnx,
    )

    spec = checkpoint.resolve(model_spec)
    output = output or (trt_dir if tensorrt else onnx_dir)(spec.slug)
    if opset is None and tensorrt and (output / SETTINGS_FILE).is_file():
        # TensorRT's export keeps its opset (ENGINE_OPSET at make engine): another would
        # export it again, which replaces the folder, and the plan beside it with it
        opset = int(load_settings(output).get("opset", TENSORRT_OPSET))
    opset = opset or (TENSORRT_OPSET if tensorrt else OPSET)
    if not MIN_OPSET <= opset <= OPSET:  # before minutes of loading
        raise ExportError(f"opset {opset} not supported: choose {MIN_OPSET} to {OPSET}")
    weights = checkpoint.fingerprint(spec)  # before loading: a change meanwhile re-exports
    if skip_existing:
        reason = stale_reason(output, spec.source, int8, opset, weights, fp16)
        if not reason:
            log.info(
                "%s already exported to %s (weights sha256 %s)",
                spec.source,
                output,
                fingerprint.short(weights),
            )
            return output
        if fp16 and not stale_reason(output, spec.source, int8, opset, weights):
            # Current but for the fp16 copy: add it beside the rest (a TensorRT plan
            # there stays; so does every other file).
            log.info("adding the fp16 copy to %s's export in %s", spec.source, output)
            return add_fp16(output)
        if reason.startswith(OLDER_INT8):
            # Only the int8 file is of an older format: quantize it again beside the others
            # (the fp32 graph, an fp16 graph, a TensorRT plan built from them stay).
            log.info("quantizing %s's int8 model again in %s: %s", spec.source, output, reason)
            return requantize_int8(output, spec, opset)
        log.info("exporting %s to %s: %s", spec.source, output, reason)
    tokenizer = checkpoint.load_tokenizer(spec)
    model = checkpoint.load_model(spec)
    weights = weights or checkpoint.fingerprint(spec)  # a hub id is cached once loaded
    shape = ModelShape.from_hf_config(model.config)
    started = time.perf_counter()
    with atomic_dir(output) as tmp:
        export_onnx(copy.deepcopy(model) if int8 else model, shape, tmp / "model.onnx", opset=opset)
        files = {"fp32": "model.onnx"}
        if int8:
            embedding = export_int8(model, shape, tmp, opset)
            files["int8"] = INT8_FILE
        if fp16:
            export_fp16(tmp / "model.onnx", tmp / FP16_FILE)
            files["fp16"] = FP16_FILE
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(
            tmp / SETTINGS_FILE,
            {
                "model": spec.recorded,
                SOURCE_FINGERPRINT: weights,
                "slug": spec.slug,
                "shape": shape.to_dict(),
                "files": files,
                "opset": opset,
                **({"int8_format": INT8_FORMAT, INT8_EMBEDDING: embedding} if int8 else {}),
                "logits": "last position only, (batch, vocab)",
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": onnxruntime.__version__,
                },
            },
        )
    log.info("exported %s to %s in %.1f s", spec.source, output, time.perf_counter() - started)
    return output


INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
INT8_EMBEDDING = "int8_token_embedding"  # "8-bit", or "fp32" where it could not be


def export_int8(model, shape, folder: Path, opset: int) -> str:
    """``model.int8.onnx`` (and its weights file) in ``folder``, quantized from an export
    with the lm_head untied; returns how the token embedding is stored."""
    from gpt2_triton.export import export_onnx, quantize_int8, weights_file

    untied = folder / "model.fp32-untied.onnx"
    export_onnx(model, shape, untied, untie_lm_head=True, opset=opset)
    try:
        quantized = quantize_int8(untied, folder / INT8_FILE, shape.vocab_size)
    finally:
        untied.unlink(missing_ok=True)
        weights_file(untied).unlink(missing_ok=True)
    if not quantized:
        log.warning("the token embedding stays fp32 in %s", folder / INT8_FILE)
    return "8-bit" if quantized else "fp32"


def requantize_int8(output: Path, spec, opset: int) -> Path:
    """Replace an export's int8 files with ones of today's format, the rest untouched. Its
    settings say the new format only once both files are in place: a run stopped halfway
    leaves the old format recorded, and the next run does this again."""
    from gpt2_triton.export import INT8_FORMAT

    model = checkpoint.load_model(spec)
    shape = ModelShape.from_hf_config(model.config)
    embedding = _write_in_place(
        output, INT8_FILE, lambda folder: export_int8(model, shape, folder, opset)
    )
    settings = load_settings(output)
    settings.update({"int8_format": INT8_FORMAT, INT8_EMBEDDING: embedding})
    write_json(output / SETTINGS_FILE, settings)
    return output


def add_fp16(output: Path) -> Path:
    """Write ``model.fp16.onnx`` (and its weights file) into an export that lacks it, the
    rest untouched; its settings name the file once both are in place."""
    from gpt2_triton.export import export_fp16

    _write_in_place(
        output, FP16_FILE, lambda folder: export_fp16(output / "model.onnx", folder / FP16_FILE)
    )
    settings = load_settings(output)
    settings["files"] = {**settings.get("files", {}), "fp16": FP16_FILE}
    write_json(output / SETTINGS_FILE, settings)
    return output


def _write_in_place(output: Path, name: str, write):
    """``write(folder)`` makes graph ``name`` and its weights file in a folder beside
    ``output``; both then replace (or join) their namesakes in ``output``, the weights
    first, the rest of the export untouched. Returns what ``write`` returned."""
    import os
    import tempfile

    from gpt2_triton.export import weights_file

    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{name}-") as folder:
        made = write(Path(folder))
        fresh = Path(folder) / name
        os.replace(weights_file(fresh), weights_file(output / name))
        os.replace(fresh, output / name)
    return made


def load_settings(folder: Path) -> dict:
    import json

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise Gpt2TritonError(f"no {SETTINGS_FILE} in {folder}: run 'make export' first")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise Gpt2TritonError(f"{path} is not valid JSON ({exc}): export again") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="hub id, 'tiny' or checkpoint folder")
    parser.add_argument(
        "--output", type=Path, help="default: artifacts/onnx/<model> (--tensorrt: trt/<model>)"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (8-bit weights, int8 compute, lm_head too)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write model.fp16.onnx (fp16, LayerNorm and softmax fp32 by explicit casts, "
        "fp16 KV cache): what TensorRT 11+ builds an fp16 plan from",
    )
    parser.add_argument(
        "--tensorrt",
        action="store_true",
        help="the export TensorRT builds a plan from, in a folder of its own "
        f"(artifacts/trt/<model>), at opset {TENSORRT_OPSET} by default",
    )
    parser.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset (default 23: fused Attention nodes; {TENSORRT_OPSET} with --tensorrt)",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when the export is current: same source, opset and weights "
        "(sha256 of the checkpoint's weight, config and tokenizer files)",
    )
    args = parser.parse_args(argv)
    logs.setup()
    return run_step(
        lambda: (
            "ONNX export in "
            + str(
                run(
                    args.model,
                    args.output,
                    args.int8,
                    args.skip_existing,
                    args.opset,
                    args.fp16,
                    tensorrt=args.tensorrt,
                )
            )
        )
    )


if __name__ == "__main__":
    sys.exit(main())
