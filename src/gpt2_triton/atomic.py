"""Write an output folder all at once, so a failed step never leaves a half-built artifact."""

from __future__ import annotations

import contextlib
import fcntl
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

    On any exception the temporary folder is removed and ``final`` is left as it was. The
    writer holds a lock on a file beside its folder while it writes: a step killed by a
    signal (or the OOM killer) runs no cleanup, and the next writer of ``final`` removes
    the folders whose lock nobody holds (a lock, unlike a pid, is seen from containers
    sharing the folder too).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    lock, lock_name = _held_lock(final)
    with lock:
        tmp = Path(lock_name.removesuffix(LOCK_SUFFIX))
        try:
            tmp.mkdir()
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(lock_name).unlink(missing_ok=True)
            raise
        # Artifacts are read by other processes, maybe as other users (a Triton container):
        # some writers (safetensors) make their files private.
        for path in (tmp, *tmp.rglob("*")):
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        Path(lock_name).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


PARTIAL = ".partial-"
LOCK_SUFFIX = ".lock"


def _held_lock(final: Path):
    """A new lock file beside ``final``, locked: the lock first, then the folder, so that
    a folder is never there without its held lock. A cleaner that took the fresh file's
    lock before us has removed it: then another."""
    while True:
        handle, name = tempfile.mkstemp(
            prefix=f".{final.name}{PARTIAL}", suffix=LOCK_SUFFIX, dir=final.parent
        )
        lock = os.fdopen(handle, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(name).st_ino == os.fstat(handle).st_ino:
                return lock, name
        except FileNotFoundError:
            pass
        lock.close()


def _remove_leftovers(final: Path) -> None:
    """The partial folders of ``final`` (and their lock files) whose writer is gone."""
    prefix = f".{final.name}{PARTIAL}"
    for entry in final.parent.glob(f"{glob.escape(prefix)}*"):
        # another output's partials may match the glob (".a.partial-x" for "a.partial-x"
        # output "a"): only the exact shape of this one's
        rest = entry.name.removeprefix(prefix).removesuffix(LOCK_SUFFIX)
        if not rest or "." in rest:
            continue
        lock = entry if entry.name.endswith(LOCK_SUFFIX) else Path(f"{entry}{LOCK_SUFFIX}")
        with contextlib.ExitStack() as held:
            try:
                handle = held.enter_context(open(lock, "a"))  # noqa: SIM115
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is at work
            except OSError:
                pass  # no lock to take (a folder of before locks, or a folder not ours)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            lock.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write ``path`` whole or not at all (a file beside it, renamed over it): a settings
    file cut short would make every later step fail reading it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
