"""Write an output folder all at once, so a failed step never leaves a half-built artifact."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``.

    On any exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Artifacts are read by other processes, maybe as other users (a Triton container):
    # mkdtemp made the folder private, and some writers (safetensors) make their files so.
    for path in (tmp, *tmp.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(final: Path) -> None:
    """The partial folders of ``final`` whose writer is gone: a step killed by a signal (or
    the OOM killer) runs no cleanup, and leaves a hidden copy of up to gigabytes."""
    for partial in final.parent.glob(f".{glob.escape(final.name)}.partial-*"):
        pid = partial.name.removeprefix(f".{final.name}.partial-").split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another process is writing it now
        shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def write_json(path: Path, data: Any) -> None:
    """Write ``path`` whole or not at all (a file beside it, renamed over it): a settings
    file cut short would make every later step fail reading it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
