"""End this process when its parent dies: a Triton Python backend stub must not outlive it.

When tritonserver dies (SIGSEGV, SIGKILL), a model's stub process that runs threads of its
own (the gpt2 generation loop) stays alive with parent pid 1, ignores SIGTERM and holds its
memory (and GPU) until someone kills it. Nothing tells a process its parent died, so a
thread polls for the change of parent that the orphaning causes.

A thread is not always enough: a stub can be blocked in a call to the dead server (a
metric update) while holding the GIL, and then no Python thread runs again. So a small
bash process watches too, from outside the interpreter, and SIGKILLs the stub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

log = logging.getLogger(__name__)


# bash, with builtins only: nothing is forked per check. The process's parent is the
# field after its state in /proc/PID/stat (the name before it, in parentheses, may hold
# spaces); its start time (field 22) tells it from a later process that reused its pid.
# `read -t` on a pipe that never gets data (this shell holds its write end) is the sleep.
_WATCHER = """
exec 3<> <(:)
while read -r stat < /proc/{pid}/stat; do
  set -- ${{stat##*) }}
  [ "${{20}}" = "{started}" ] || exit 0
  [ "$2" = "{parent}" ] || {{ kill -9 {pid}; exit 0; }}
  read -r -t {interval} -u 3
done 2>/dev/null
"""


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def exit_with_parent(interval: float = 0.5) -> threading.Thread:
    """Exit this process (status 1) once its parent changes: a daemon thread, and a shell
    watcher that SIGKILLs it should the thread be unable to run."""
    parent = os.getppid()
    pid = os.getpid()
    script = _WATCHER.format(
        pid=pid, parent=parent, started=_start_time(pid), interval=max(interval, 0.05) * 2
    )
    subprocess.Popen(
        ["/bin/bash", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("parent process %d is gone: exiting (pid %d)", parent, os.getpid())
        os._exit(1)  # no clean-up: other threads may hold locks; the OS frees the rest

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
