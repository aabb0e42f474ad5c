"""``make export``: checkpoint -> ``artifacts/onnx/<model>/`` (model.onnx + settings + tokenizer).

    python -m build_scripts.export_onnx --model tiny [--int8]

The folder is written all at once; it holds ``model.onnx`` (its weights in
``model.onnx.data``), optionally ``model.int8.onnx`` (``model.int8.onnx.data``),
``export_settings.json`` (what was built, from what, with which versions) and
``tokenizer/``. Later steps (verify, make repo) read only this folder.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from gpt2_triton import checkpoint, logs
from gpt2_triton.atomic import atomic_dir, write_json
from gpt2_triton.cli import run_step
from gpt2_triton.engines.factory import SETTINGS_FILE
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import ExportError, Gpt2TritonError

log = logging.getLogger("build_scripts.export_onnx")


def onnx_dir(slug: str) -> Path:
    return checkpoint.artifacts_root() / "onnx" / slug


def is_current(folder: Path, source: str, int8: bool, opset: int) -> bool:
    """True when ``folder`` already holds an export of ``source`` at ``opset`` (with int8
    if asked)."""
    try:
        settings = load_settings(folder)
    except Gpt2TritonError:
        return False
    from gpt2_triton.export import weights_file

    files = [folder / name for name in settings.get("files", {}).values()]
    return (
        settings.get("model") == source
        and settings.get("opset") == opset
        and (not int8 or "int8" in settings["files"])
        and all(f.is_file() and weights_file(f).is_file() for f in files)
    )


def run(
    model_spec: str,
    output: Path | None = None,
    int8: bool = False,
    skip_existing: bool = False,
    opset: int | None = None,
) -> Path:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from gpt2_triton.export import (
        MIN_OPSET,
        OPSET,
        export_onnx,
        quantize_int8,
        weights_file,
    )

    opset = opset or OPSET
    if not MIN_OPSET <= opset <= OPSET:  # before minutes of loading
        raise ExportError(f"opset {opset} not supported: choose {MIN_OPSET} to {OPSET}")
    spec = checkpoint.resolve(model_spec)
    output = output or onnx_dir(spec.slug)
    if skip_existing and is_current(output, spec.source, int8, opset):
        log.info("%s already exported to %s", spec.source, output)
        return output
    tokenizer = checkpoint.load_tokenizer(spec)
    model = checkpoint.load_model(spec)
    shape = ModelShape.from_hf_config(model.config)
    started = time.perf_counter()
    with atomic_dir(output) as tmp:
        export_onnx(copy.deepcopy(model) if int8 else model, shape, tmp / "model.onnx", opset=opset)
        files = {"fp32": "model.onnx"}
        if int8:
            untied = tmp / "model.fp32-untied.onnx"
            export_onnx(model, shape, untied, untie_lm_head=True, opset=opset)
            quantize_int8(untied, tmp / "model.int8.onnx")
            untied.unlink()
            weights_file(untied).unlink()
            files["int8"] = "model.int8.onnx"
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(
            tmp / SETTINGS_FILE,
            {
                "model": spec.source,
                "slug": spec.slug,
                "shape": shape.to_dict(),
                "files": files,
                "opset": opset,
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


def load_settings(folder: Path) -> dict:
    import json

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise Gpt2TritonError(f"no {SETTINGS_FILE} in {folder}: run 'make export' first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="hub id, 'tiny' or checkpoint folder")
    parser.add_argument("--output", type=Path, help="default: artifacts/onnx/<model>")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (8-bit weights, int8 compute, lm_head too)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        help="ONNX opset (default 23: fused Attention nodes; 18 for TensorRT before 10.14)",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when this model is already exported",
    )
    args = parser.parse_args(argv)
    logs.setup()
    return run_step(
        lambda: (
            "ONNX export in "
            f"{run(args.model, args.output, args.int8, args.skip_existing, args.opset)}"
        )
    )


if __name__ == "__main__":
    sys.exit(main())
