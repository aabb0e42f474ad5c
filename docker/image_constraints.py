"""Print the serving image's constraints: the project's pins with the image's exceptions.

    python3 docker/image_constraints.py > /tmp/image-constraints.txt

``constraints.txt`` (the project's pins, one source for every environment) with each line
that ``docker/constraints.txt`` pins differently replaced by that line. docker/Dockerfile
installs with this output and tests/test_gpu_image.py resolves with it: one merge for both.
Standard library only: it runs in the bare Triton image before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent / "constraints.txt"
IMAGE = HERE / "constraints.txt"


def package(line: str) -> str | None:
    """The normalised package name a constraint line pins (PEP 503), None for comments."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def merged(project: str, image: str) -> str:
    exceptions = {package(line): line for line in image.splitlines() if package(line)}
    lines = [exceptions.pop(package(line), line) for line in project.splitlines()]
    return "\n".join([*lines, *exceptions.values()]) + "\n"  # new packages last


def main() -> int:
    sys.stdout.write(merged(PROJECT.read_text(), IMAGE.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
