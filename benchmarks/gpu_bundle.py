"""What ``gpu_bench.sh`` needs on a GPU machine that has no network, packed here.

    python -m benchmarks.gpu_bundle [--out .gpu_bundle]

A lent GPU machine has Python 3.12 with PyTorch, Transformers and the CUDA libraries, and
reaches no package index. It lacks what this project adds: the ``tritonserver`` binary and
its Python backend (``nvidia-pytriton``), ``tritonclient`` for the clients, numpy < 2 for
the backend stub (see docs/GPU.md), and the bench model's tokenizer. This packs them:

- ``site.tar.xz``: those packages unpacked for CPython 3.12 on x86-64 Linux (pip's own
  resolver picks the files), less what the benchmark never runs: the backend stubs and
  ``libpython`` of the other Python versions, ``perf_analyzer`` (a C++ client, 20 MB),
  pytriton's own Python API. ``gpu_bench.sh`` unpacks it into a virtual environment that
  sees the machine's PyTorch behind it.
- ``model/``: the bench model's ``config.json`` and tokenizer files (GPT-2's, from
  ``make bench-model``); the weights are drawn again there from a fixed seed (random
  weights: speed does not depend on their values), 500 MB that need not travel.
- ``manifest.json``: what is inside, for ``gpu_bench.sh --dry-run`` to check.

Everything a device call carries must fit in 64 MiB with the repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt2_triton import logs
from gpt2_triton.cli import run_step
from gpt2_triton.errors import Gpt2TritonError

PYTHON_VERSION = "3.12"  # the GPU machines' python3 (docs/GPU.md)
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64")
PACKAGES = (
    "nvidia-pytriton==0.7.0",  # tritonserver 2.51 and its Python backend
    "tritonclient==2.51.0",  # the gRPC client (its grpcio and protobuf are the machine's)
    "python-rapidjson==1.22",  # tritonclient.grpc imports it
    "numpy==1.26.4",  # the backend stub needs numpy < 2 (NOTES: numpy 2 empties outputs)
)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
BUNDLE_LIMIT_BYTES = 60 * 2**20  # of the device call's 64 MiB; the rest is the repository
SITE = "site.tar.xz"
MANIFEST = "manifest.json"


def _pruned(path: Path, python: str) -> bool:
    """Files of the unpacked packages that the benchmark never uses."""
    parts = path.parts
    if "python_backend_stubs" in parts:  # keep the stub of the machine's Python only
        return python not in parts
    name = path.name
    if name.startswith("libpython3") and f".{python.split('.')[1]}." not in name:
        return True  # another Python's libpython, for another stub
    if parts[-2:-1] == ("bin",) and name in {"perf_analyzer", "perf_client"}:
        return True
    # pytriton's Python API; its __init__ stays, for find_spec to find the package as
    # a regular one (triton_server.triton_home)
    python_api = parts[0] == "pytriton" and path.suffix == ".py" and parts[1] != "tritonserver"
    return python_api and name != "__init__.py"


def build(out: Path, model_dir: Path, python: str = PYTHON_VERSION) -> Path:
    """The bundle for CPython ``python`` (the GPU machines' 3.12; another version
    rehearses the whole run on a machine like this one, see tests/test_gpu_bench.py)."""
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise Gpt2TritonError(
            f"{model_dir} lacks {', '.join(missing)}: run 'make bench-model' first"
        )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
            "--only-binary=:all:", "--python-version", python, "--implementation",
            "cp", "--target", str(site),
            *(f"--platform={p}" for p in PLATFORMS),
            *PACKAGES,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise Gpt2TritonError(f"pip could not fetch the packages: {result.stderr.strip()}")
        files = [p for p in site.rglob("*") if p.is_file()]
        kept = [p for p in files if not _pruned(p.relative_to(site), python)]
        with tarfile.open(out / SITE, "w:xz", preset=9) as tar:
            for path in sorted(kept):
                tar.add(path, arcname=str(path.relative_to(site)))
    model = out / "model"
    model.mkdir(exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(model_dir / name, model / name)
    manifest = {
        "python": python,
        "packages": list(PACKAGES),
        "files": {
            str(p.relative_to(out)): p.stat().st_size
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    total = sum(manifest["files"].values())
    if total > BUNDLE_LIMIT_BYTES:
        raise Gpt2TritonError(
            f"the bundle is {total / 2**20:.1f} MiB, over {BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB"
        )
    return out


def check(bundle: Path, python: str = PYTHON_VERSION) -> list[str]:
    """What is wrong with ``bundle`` for CPython ``python`` (nothing: an empty list)."""
    manifest = bundle / MANIFEST
    if not manifest.is_file():
        return [f"no {manifest}: run 'make gpu-bundle' (python -m benchmarks.gpu_bundle)"]
    data = json.loads(manifest.read_text())
    problems = []
    if data.get("python") != python:
        problems.append(f"built for Python {data.get('python')}, not {python}")
    if sorted(data.get("packages", [])) != sorted(PACKAGES):
        problems.append("built for other packages than benchmarks/gpu_bundle.py lists")
    for name, size in data.get("files", {}).items():
        path = bundle / name
        if not path.is_file() or path.stat().st_size != size:
            problems.append(f"{path} is missing or changed since the bundle was built")
    for name in [SITE, *(f"model/{f}" for f in MODEL_FILES)]:
        if name not in data.get("files", {}):
            problems.append(f"the bundle lacks {name}")
    total = sum(data.get("files", {}).values())
    if total > BUNDLE_LIMIT_BYTES:
        problems.append(f"the bundle is {total / 2**20:.1f} MiB, over the limit")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu_bundle"))
    parser.add_argument("--python-version", default=PYTHON_VERSION, help="the GPU machine's")
    parser.add_argument(
        "--model", type=Path, default=Path("artifacts/models/gpt2-small-random"),
        help="the bench model (make bench-model): its config and tokenizer travel",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logs.setup()

    def step() -> str:
        out = build(args.out, args.model, args.python_version)
        total = sum(json.loads((out / MANIFEST).read_text())["files"].values())
        return f"GPU bundle in {out} ({total / 2**20:.1f} MiB)"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
