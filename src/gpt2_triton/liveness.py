"""Liveness: a process that is alive but answers nothing is restarted like one that exited.

A ``tritonserver`` stopped, deadlocked or starved of its threads keeps its process and its
sockets: the kernel still completes TCP handshakes for it, so its clients connect and then
wait, and a supervisor that watches only for an exit waits with them. The supervisor asks
each process it runs, the way Kubernetes' liveness probe asks a pod (the same numbers as
deploy/k8s), and kills it after ``failures`` checks in a row got no answer; its exit is
then handled like any other (restarted, with the backoff).

Only silence counts. An HTTP answer of any status is an answer (Triton says "live" while a
model is stuck; that is not a reason to kill it here), and so is a refused connection: the
process is starting, or going, which the exit path handles.
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LivenessRule:
    period_s: float = 10.0  # from the end of one check to the start of the next
    timeout_s: float = 5.0  # a check with no answer in this long counts as silence
    failures: int = 3  # silent checks in a row before the process is killed

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.timeout_s <= 0 or self.failures < 1:
            raise ValueError(f"a liveness rule needs positive times and failures: {self}")

    def describe(self) -> str:
        return f"{self.failures} liveness checks in a row ({self.timeout_s:g} s each)"


# every process the supervisor runs: Triton's replicas (deploy/k8s/base/triton.yaml's
# livenessProbe has the same numbers: tests/test_k8s.py holds them equal) and the OpenAI
# gateway, which answers /health/live from its event loop (a blocked loop is silent)
LIVENESS = LivenessRule(period_s=10.0, timeout_s=5.0, failures=3)


def answers(url: str, timeout: float) -> bool:
    """Whether something answered ``url`` within ``timeout`` s: False only for silence."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except (urllib.error.HTTPError, http.client.HTTPException):
        return True  # a status, or something that is not HTTP: an answer either way
    except urllib.error.URLError as exc:  # raised for the connect and for the response
        return not isinstance(exc.reason, TimeoutError)
    except TimeoutError:  # while reading the body
        return False
    except OSError:  # refused, reset: nobody there, not somebody silent
        return True


class SilenceWatch:
    """Checks ``url`` every ``rule.period_s`` on a thread of its own (a silent check takes
    ``timeout_s``; the supervisor's tick must not wait for it) and counts the silent ones
    in a row. The supervisor reads ``silent()`` and calls ``reset()`` when it starts the
    process again."""

    def __init__(self, url: str, rule: LivenessRule | None, name: str) -> None:
        """``rule`` None: no checks (never silent)."""
        self.url = url
        self.rule = rule
        self._silent_in_a_row = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> SilenceWatch:
        if self.rule is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def silent(self) -> bool:
        with self._lock:
            return self.rule is not None and self._silent_in_a_row >= self.rule.failures

    def reset(self) -> None:
        with self._lock:
            self._silent_in_a_row = 0

    def _run(self) -> None:
        while not self._stop.wait(self.rule.period_s):
            try:
                answered = answers(self.url, self.rule.timeout_s)
            except Exception:  # the watch must outlive any surprise; a surprise is no silence
                log.exception("liveness check of %s failed", self.url)
                answered = True
            with self._lock:
                self._silent_in_a_row = 0 if answered else self._silent_in_a_row + 1
