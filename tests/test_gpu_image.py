"""The serving image's dependency set, proved without Docker: pip's resolver, in dry-run
mode, for the image's Python and platform, on exactly the files docker/Dockerfile installs.

Needs PyPI (pip's cache makes a second run quick); no image is pulled or built.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Ubuntu 24.04, the base of Triton's Python 3.12 images: glibc 2.39, so every manylinux
# wheel up to 2_39 installs there. pip takes no range, only a list of tags.
IMAGE_GLIBC_MINOR = 39


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"docker/Dockerfile has no ARG {name}=..."
    return match.group(1)


def image_constraints(tmp_path: Path) -> Path:
    """The constraints docker/Dockerfile installs with, written by the same script."""
    out = tmp_path / "image-constraints.txt"
    text = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "image_constraints.py")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    out.write_text(text)
    return out


def test_the_dockerfile_installs_what_this_test_resolves():
    text = DOCKERFILE.read_text()
    install = re.search(r"RUN python3 docker/image_constraints\.py[^\n]*\n(?:.*\\\n)*.*", text)
    assert install, "the Dockerfile's pip install line changed: update this test with it"
    line = install.group(0)
    assert "-r docker/requirements.txt" in line and "-c /tmp/image-constraints.txt" in line
    assert "--only-binary=:all:" in line  # as resolved below: no sdist builds in the image
    assert "ARG TRITON_IMAGE=" in text and "FROM ${TRITON_IMAGE}" in text
    # the tested image is the one the documentation names
    assert dockerfile_arg("TRITON_IMAGE") in (ROOT / "docs" / "GPU.md").read_text()


# The project's dependencies the image leaves out, and why (any other one must be there:
# the gateway ran without uvloop/httptools in the image, slower than it was measured here)
NOT_IN_THE_IMAGE = {
    "accelerate": "training",
    "datasets": "training",
    "pyarrow": "training (datasets)",
    "nvidia-pytriton": "its tritonserver: the image is Triton's",
}


def test_the_image_installs_every_serving_dependency_of_the_project():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[\[=<>]", dep)[0].lower() for dep in project["dependencies"]}
    lines = (ROOT / "docker" / "requirements.txt").read_text().splitlines()
    image = {
        re.split(r"[\[=<>]", line)[0].strip().lower()
        for line in lines
        if line.strip() and not line.startswith("#")
    }
    assert wanted - image == set(NOT_IN_THE_IMAGE), "add it to docker/requirements.txt"


def test_image_constraints_replace_the_project_pins_they_override():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from image_constraints import merged
    finally:
        sys.path.remove(str(ROOT / "docker"))
    project = "# pins\nnumpy==1.26.4\nProtobuf==4.25.9\ntorch==2.13.0\n"
    image = "# why\nprotobuf==6.33.6\nextra-package==1.0\n"
    assert merged(project, image) == (
        "# pins\nnumpy==1.26.4\nprotobuf==6.33.6\ntorch==2.13.0\nextra-package==1.0\n"
    )


@pytest.mark.slow
def test_image_dependency_set_resolves_for_the_image_python(tmp_path):
    """Every pin has a wheel for the image's Python and platform, no two conflict, torch is
    a build for the image's CUDA major version, and no second TensorRT comes in."""
    python = dockerfile_arg("IMAGE_PYTHON")
    cuda_major = int(dockerfile_arg("IMAGE_CUDA_MAJOR"))
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
        "--quiet", "--only-binary=:all:", "--python-version", python,
        "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
        *[arg for platform in platforms for arg in ("--platform", platform)],
        "--target", str(tmp_path / "target"), "--report", str(report),
        "-r", str(ROOT / "docker" / "requirements.txt"), "-c", str(image_constraints(tmp_path)),
    ]  # fmt: skip
    # This machine's own pip settings (local wheel folders, caps, extra indexes) are not
    # the image's: PyPI alone, as in the image.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"pip's resolver for Python {python}:\n{done.stderr[-4000:]}"
    installed = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]
        for item in json.loads(report.read_text())["install"]
    }
    for name in ("torch", "transformers", "onnxruntime", "tritonclient", "gradio", "numpy"):
        assert name in installed, f"{name} is not in the image's dependency set"
    assert installed["numpy"]["version"].startswith("1.")  # Triton's Python backend stub
    assert not [n for n in installed if n.startswith("tensorrt")], "the image has TensorRT"
    # torch's wheel names the CUDA toolkit it was built with: cuda-toolkit==13.0.x (or
    # nvidia-*-cu13 packages in older releases).
    torch_cuda = {
        int(m.group(1))
        for req in installed["torch"].get("requires_dist", [])
        for m in [re.match(r"(?:cuda-toolkit\S*==|nvidia-\S+-cu)(\d+)", req)]
        if m
    }
    assert torch_cuda == {cuda_major}, f"torch is built for CUDA {torch_cuda}"
