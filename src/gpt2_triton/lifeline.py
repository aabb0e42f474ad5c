"""End this process when its parent dies: a Triton Python backend stub must not outlive it.

When tritonserver dies (SIGSEGV, SIGKILL), a model's stub process that runs threads of its
own (the gpt2 generation loop) stays alive with parent pid 1, ignores SIGTERM and holds its
memory (and GPU) until someone kills it. Nothing tells a process its parent died, so a
thread polls for the change of parent that the orphaning causes.

A thread is not always enough: a stub can be blocked in a call to the dead server (a
metric update) while holding the GIL, and then no Python thread runs again. So a tiny
shell process watches too, from outside the interpreter, and SIGKILLs the stub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

log = logging.getLogger(__name__)


# POSIX sh: the process's parent is the field after state in /proc/PID/stat (the name,
# in parentheses, may hold spaces: cut what precedes its closing parenthesis).
_WATCHER = """
while [ -d /proc/{pid} ]; do
  stat=$(cat /proc/{pid}/stat 2>/dev/null) || exit 0
  set -- ${{stat##*) }}
  [ "$2" = "{parent}" ] || {{ kill -9 {pid} 2>/dev/null; exit 0; }}
  sleep {interval}
done
"""


def exit_with_parent(interval: float = 0.5) -> threading.Thread:
    """Exit this process (status 1) once its parent changes: a daemon thread, and a shell
    watcher that SIGKILLs it should the thread be unable to run."""
    parent = os.getppid()
    script = _WATCHER.format(pid=os.getpid(), parent=parent, interval=max(interval, 0.05) * 2)
    subprocess.Popen(
        ["/bin/sh", "-c", script],
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
