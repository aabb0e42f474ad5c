"""The stub's lifeline: a process whose parent dies exits by itself."""

import subprocess
import sys
import time

import psutil

# The intermediate parent: starts the watched grandchild, says its pid, then waits to be
# killed (or ends with the child, so that a child that failed to start fails the test at once).
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
child.wait()
"""
CHILD = """
import time
from gpt2_triton import lifeline
lifeline.exit_with_parent(interval=0.05)
print("ready", flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:  # an orphan that exited stays a zombie until its new parent reaps it
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_process_whose_parent_dies_exits():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        lines = {parent.stdout.readline().strip() for _ in range(2)}  # pid and "ready"
        lines.discard("ready")
        child = int(lines.pop())
        time.sleep(0.3)  # several polls: it lives while its parent does
        assert _running(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child)
    finally:
        parent.kill()
        parent.wait(10)
        if child is not None and _running(child):
            psutil.Process(child).kill()


def test_a_process_whose_threads_cannot_run_is_killed_by_the_watcher():
    """A stub blocked in a call to the dead server while holding the GIL runs no Python
    thread again; SIGSTOP stands in for that here (it freezes every thread)."""
    import signal

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        lines = {parent.stdout.readline().strip() for _ in range(2)}
        lines.discard("ready")
        child = int(lines.pop())
        psutil.Process(child).send_signal(signal.SIGSTOP)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child)
    finally:
        parent.kill()
        parent.wait(10)
        if child is not None and _running(child):
            psutil.Process(child).kill()
