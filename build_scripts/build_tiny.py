"""``make tiny``: build the tiny GPT-2 checkpoint and its corpus, offline, in seconds.

    python -m build_scripts.build_tiny [--force]

Writes ``artifacts/models/tiny/`` (loads like ``gpt2``) and ``artifacts/data/tiny/``
(``train.txt``, ``validation.txt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_triton import checkpoint, logs


def data_dir() -> Path:
    return checkpoint.artifacts_root() / "data" / checkpoint.TINY


def ensure(force: bool = False) -> Path:
    from gpt2_triton.tiny.build import build

    out = checkpoint.tiny_checkpoint_dir()
    corpus = [data_dir() / name for name in ("train.txt", "validation.txt")]
    if force or not (out / "config.json").is_file() or not all(f.is_file() for f in corpus):
        build(out, data_dir())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    logs.setup()
    out = ensure(args.force)
    print(f"tiny model in {out}; corpus in {data_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
