"""Content fingerprints: tie every artifact to the exact bytes it was built from.

A path string says nothing about what is in the folder today: train into ``runs/ft`` again
and the path is the same while the weights are not. So each build step records the
sha256 of its inputs (the checkpoint's weights, config and tokenizer; the ONNX files a
TensorRT plan came from) and compares them before reusing what it built.

A fingerprint is a plain dict, stored as is in the ``*_settings.json`` files::

    {"sha256": "<digest over the names and digests below>",
     "files": {"model.safetensors": "<sha256>", "config.json": "<sha256>", ...}}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK_BYTES = 1 << 20  # GPT-2 XL's weights are 6 GB: never read a file whole

# The key, in export_settings.json and model_repository/build_settings.json, of the
# checkpoint's content fingerprint.
SOURCE_FINGERPRINT = "source_fingerprint"

# What decides the exported graph and the served text: the architecture (config.json),
# the weights and the tokenizer. Not the training logs or metrics saved beside them.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

Fingerprint = dict  # {"sha256": str, "files": {name: sha256}}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def of_files(folder: Path, names: Iterable[str]) -> Fingerprint:
    """The fingerprint of ``names`` (relative to ``folder``; a missing file is an error)."""
    folder = Path(folder)
    files = {name: file_sha256(folder / name) for name in sorted(set(names))}
    combined = hashlib.sha256()
    for name, sha in files.items():  # names too: a renamed shard is another checkpoint
        combined.update(f"{name}\0{sha}\n".encode())
    return {"sha256": combined.hexdigest(), "files": files}


def weight_files(folder: Path) -> list[str]:
    """The weight files ``from_pretrained`` reads: safetensors when present (transformers
    prefers them), else the PyTorch ``.bin`` files; with their shard index, if any."""
    folder = Path(folder)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        weights = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    return weights + sorted(p.name for p in folder.glob("*.index.json"))


def checkpoint_files(folder: Path) -> list[str]:
    folder = Path(folder)
    present = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if (folder / n).is_file()]
    return weight_files(folder) + present


def of_checkpoint(folder: Path) -> Fingerprint:
    """The fingerprint of a checkpoint folder: weights, config and tokenizer files."""
    return of_files(folder, checkpoint_files(folder))


def repository_drift(repository: Path) -> str:
    """Why the weights ``repository`` serves are no longer what its checkpoint holds (it
    was trained again since ``make repo``), for an error line; ``""`` when they are, or
    when that cannot be told (no build_settings.json, the checkpoint gone, a hub id not in
    the local cache)."""
    import json

    from gpt2_triton import checkpoint
    from gpt2_triton.errors import Gpt2TritonError

    try:
        built = json.loads((Path(repository) / "build_settings.json").read_text())
        source, recorded = built["model_source"], built[SOURCE_FINGERPRINT]
        current = checkpoint.fingerprint(checkpoint.resolve(source)) if recorded else None
    except (OSError, ValueError, KeyError, TypeError, Gpt2TritonError):
        return ""
    changed = difference(recorded, current) if current else ""
    return f"{source}'s {changed}" if changed else ""


def short(fingerprint: Fingerprint | None) -> str:
    """A digest prefix for log lines."""
    return fingerprint["sha256"][:12] if fingerprint else "none"


def difference(recorded: Fingerprint | None, current: Fingerprint) -> str:
    """Why ``recorded`` is not ``current``, for a log line; ``""`` when they match."""
    if not recorded or "sha256" not in recorded:
        return "no content fingerprint recorded (built before fingerprints were kept)"
    if recorded["sha256"] == current["sha256"]:
        return ""
    old, new = recorded.get("files", {}), current["files"]
    changed = [n for n in new if n in old and old[n] != new[n]]
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    parts = [
        f"{label} {', '.join(group)}"
        for label, group in (("changed:", changed), ("new:", added), ("gone:", removed))
        if group
    ]
    detail = "; ".join(parts) or "different files"
    return f"content changed (sha256 {short(recorded)} -> {short(current)}; {detail})"
