"""Child processes that never outlive the service: their own process group, ended whole.

Triton's Python backend stubs are children of ``tritonserver`` in its process group; when
the server dies by a signal, a stub that runs its own threads (``gpt2``) stays behind with
parent pid 1. Ending the whole group ends them too; ``die_with_parent`` makes the kernel
end a child when the launcher itself is killed (SIGKILL leaves it no time to clean up).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the supervisor's own clean-up still applies
        pass


def popen_dying_with_parent(command: list[str], **popen_args) -> subprocess.Popen:
    """``subprocess.Popen`` of a child the kernel kills when the thread that started it
    dies. util-linux's ``setpriv --pdeathsig`` sets that and execs the command, so Python
    runs no code between fork and exec: a ``preexec_fn`` forks the whole interpreter, and in
    a process that uses gRPC (tests, the benchmark harness) the child can abort in gRPC's
    fork handling before it execs. Without setpriv, the ``preexec_fn``."""
    setpriv = _setpriv_with_pdeathsig()
    if setpriv:
        return subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *command], **popen_args)
    return subprocess.Popen(command, preexec_fn=die_with_parent, **popen_args)


@functools.cache
def _setpriv_with_pdeathsig() -> str | None:
    """setpriv, when it has --pdeathsig (util-linux 2.33 on; busybox's has not)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return setpriv if probe.returncode == 0 else None


def group_alive(pgid: int) -> bool:
    """True while a process of the group exists (zombies excluded)."""
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """Pids of the group's processes (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def shared_memory_files(pgid: int) -> set[str]:
    """The ``/dev/shm`` files the group's processes have mapped.

    Triton's Python backend keeps a region there per model instance and removes it when it
    shuts down; a server that dies by a signal leaves them behind (~1 MB each, more once
    they grow). Noting them while the server runs lets its supervisor remove them after.
    """
    found = set()
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                found.update(
                    line.split(maxsplit=5)[5].strip()
                    for line in f
                    if " /dev/shm/" in line and line.count(" ") >= 5
                )
        except OSError:
            continue
    return {path.removesuffix(" (deleted)") for path in found}


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(process: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 10.0):
    """Ask the process to stop, wait, then kill whatever of its group is left.

    The process was started with ``start_new_session=True``, so its pid is its group id.
    Only the leader gets ``signum``: Triton unloads its models (and ends their stubs) in
    order. Returns the process's exit code.
    """
    pgid = process.pid
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    # A leader that was already gone (crashed, killed) shuts nothing down in order: what is
    # left of its group are orphans, possibly stuck on it (a stub blocked on a call to the
    # dead server holds its GIL, so its lifeline never runs). Kill them now, not in `timeout`.
    signal_group(pgid, signal.SIGKILL)
    code = process.wait()
    deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return code
