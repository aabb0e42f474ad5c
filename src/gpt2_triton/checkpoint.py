"""Resolve a MODEL spec (hub id, ``tiny`` or a local folder) and load it with clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gpt2_triton.errors import CheckpointError

log = logging.getLogger(__name__)

TINY = "tiny"
ARTIFACTS_ENV = "GPT2_TRITON_ARTIFACTS"


def artifacts_root() -> Path:
    """Where build outputs land: ``$GPT2_TRITON_ARTIFACTS`` or ``./artifacts``."""
    return Path(os.environ.get(ARTIFACTS_ENV, "artifacts"))


def tiny_checkpoint_dir() -> Path:
    return artifacts_root() / "models" / TINY


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for, resolved once.

    ``source`` is what ``from_pretrained`` receives; ``slug`` names the artifacts built from
    it (``artifacts/onnx/<slug>/``): the hub id, or a checkpoint folder's name with a hash
    of where it is (``runs/ft`` -> ``ft-3f2a9c1b``), so that two folders of one name
    (``runs/ft``, ``other/ft``) never share, or replace, each other's exports.
    ``recorded`` is what build outputs record as their source: a folder's absolute path,
    which any later step, from any folder, can find again.
    """

    source: str
    slug: str
    is_local: bool

    @property
    def recorded(self) -> str:
        return str(Path(self.source).resolve()) if self.is_local else self.source

    @property
    def name(self) -> str:
        """What clients call it (the OpenAI API's model id): the slug, less a folder's hash."""
        return _slug(Path(self.source).resolve().name) if self.is_local else self.slug


def resolve(spec: str) -> ModelSpec:
    """Turn ``gpt2`` / ``tiny`` / ``path/to/ckpt`` into a :class:`ModelSpec`.

    A spec that exists on disk, starts like a path (``/``, ``.``, ``~``), has more than one
    ``/`` or whose first part is a folder here (``runs/ft`` before training) must be a
    checkpoint folder; anything else is a hub id (``gpt2``, ``openai-community/gpt2``).
    """
    if not spec or not spec.strip():
        raise CheckpointError("MODEL is empty: give a hub id (gpt2), 'tiny' or a folder")
    spec = spec.strip()
    if spec == TINY:
        folder = tiny_checkpoint_dir()
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"the tiny model is not built yet ({folder}): run 'make tiny' first"
            )
        return ModelSpec(str(folder), TINY, True)
    path = Path(spec).expanduser()
    if (
        path.exists()
        or spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or Path(spec.split("/")[0]).is_dir()
    ):
        check_checkpoint_dir(path)
        return ModelSpec(str(path), local_slug(path), True)
    return ModelSpec(spec, _slug(spec.replace("/", "--")), False)


def local_slug(folder: Path) -> str:
    """A checkpoint folder's name, with a hash of where it is (see ModelSpec): its path
    within the working folder when it is inside it (the project's checkout, mounted at
    another path in a container, names it alike), else its absolute path."""
    where = Path(folder).resolve()
    try:
        key = where.relative_to(Path.cwd().resolve())
    except ValueError:
        key = where
    return f"{_slug(where.name)}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}"


def same_checkpoint(recorded: str | None, source: str) -> bool:
    """Whether an export's recorded ``model`` is ``source`` (a ModelSpec's): one hub id, or
    one folder (``runs/ft`` and ``./runs/ft`` are one; exports record absolute paths,
    older ones the path as given, read from the working folder)."""
    if recorded == source:
        return True
    if recorded is None or not Path(source).exists():
        return False
    return Path(recorded).expanduser().resolve() == Path(source).expanduser().resolve()


def check_checkpoint_dir(path: Path) -> None:
    """Fail early, with the reason, on a folder that is not a loadable checkpoint."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"not a checkpoint folder (no config.json): {path}")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"malformed config.json in {path}: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"config.json in {path} has no 'model_type'")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckpointError(f"no weights (*.safetensors) in checkpoint folder {path}")


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "model"


def _hub_error(spec: ModelSpec, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot load '{spec.source}' from the Hugging Face hub ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Without network access "
        "use MODEL=tiny (built locally) or MODEL=path/to/checkpoint"
        + (f"; there is no folder {spec.source} here either" if "/" in spec.source else "")
    )


def local_folder(spec: ModelSpec) -> Path | None:
    """The folder ``from_pretrained`` reads ``spec`` from: the checkpoint folder itself, or
    for a hub id its snapshot in the local Hugging Face cache (``None`` when not cached yet;
    nothing is downloaded here)."""
    if spec.is_local:
        return Path(spec.source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): nothing to fingerprint yet
        return None


def fingerprint(spec: ModelSpec) -> dict | None:
    """The content fingerprint of what ``spec`` loads today (weights, config, tokenizer);
    ``None`` for a hub id not in the local cache."""
    from gpt2_triton import fingerprint as fp

    folder = local_folder(spec)
    return fp.of_checkpoint(folder) if folder else None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.source)
    except Exception as exc:  # transformers raises many types; all mean "cannot load"
        if not spec.is_local:
            raise _hub_error(spec, exc) from exc
        raise CheckpointError(f"cannot load the tokenizer from {spec.source}: {exc}") from exc


def load_model(spec: ModelSpec, dtype=None):
    """Load a causal LM in eval mode; ``dtype`` defaults to fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=dtype or torch.float32)
    except Exception as exc:
        if not spec.is_local:
            raise _hub_error(spec, exc) from exc
        raise CheckpointError(f"cannot load the model from {spec.source}: {exc}") from exc
    if model.config.model_type != "gpt2":
        raise CheckpointError(
            f"{spec.source} is a '{model.config.model_type}' model; this project serves gpt2"
        )
    return model.eval()
