"""End this process when its parent dies: a Triton Python backend stub must not outlive it.

When tritonserver dies (SIGSEGV, SIGKILL), a model's stub process that runs threads of its
own (the gpt2 generation loop) stays alive with parent pid 1, ignores SIGTERM and holds its
memory (and GPU) until someone kills it. Nothing tells a process its parent died, so a
thread polls for the change of parent that the orphaning causes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def exit_with_parent(interval: float = 0.5) -> threading.Thread:
    """Start a daemon thread that exits the process (status 1) once the parent changes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("parent process %d is gone: exiting (pid %d)", parent, os.getpid())
        os._exit(1)  # no clean-up: other threads may hold locks; the OS frees the rest

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
