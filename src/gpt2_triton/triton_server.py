"""Start and stop a real ``tritonserver``: the binary from the ``nvidia-pytriton`` wheel.

``gpt2_triton.serve`` runs it behind the Envoy front door (``make serve``, the tests'
session fixture); the benchmark harness also starts it bare. No Docker needed:
the wheel carries Triton 2.51 with the Python backend; ``prepare()`` copies the backend
stub for the running Python into place and sets up ``PATH`` so that the stub finds this
virtualenv (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gpt2_triton.errors import Gpt2TritonError
from gpt2_triton.process import popen_dying_with_parent, stop_group

log = logging.getLogger(__name__)


class ServerError(Gpt2TritonError):
    pass


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def triton_home() -> Path:
    # find_spec locates the package without importing it: pytriton's own Python API (and
    # its dependencies) is not needed, only the server it carries.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: run 'make setup'")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def prepare() -> tuple[Path, Path, dict[str, str]]:
    """The binary, the backends folder and the environment to start it with."""
    home = triton_home()
    binary = home / "bin" / "tritonserver"
    backends = home / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = backends / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no Triton Python backend stub for Python {version} in {home}")
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    env = dict(os.environ)
    # The stub runs the first python3 on PATH to find its packages: this virtualenv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH")] if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return binary, backends, env


class TritonServer:
    """A ``tritonserver`` process: start, wait until ready, stop (terminate, then kill)."""

    def __init__(
        self,
        model_repository: Path,
        ports: Ports = Ports(),
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 120.0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports
        self.host = host
        self.log_file = log_file
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout  # for `with`: models that compile at load take long
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        binary, backends, _ = prepare()
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--model-control-mode=none",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        if not (self.model_repository / "gpt2" / "config.pbtxt").is_file():
            raise ServerError(
                f"{self.model_repository} is not rendered: run 'make repo' (MODEL=..., ENGINE=...)"
            )
        _, _, env = prepare()
        self.remove_shared_memory()  # left by a server on this port that died by a signal
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            # appended: a restart keeps the log of the crash before it
            self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 (closed in stop())
        self.process = popen_dying_with_parent(
            self.command(),
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C in a terminal reaches us, and we end the group
            # (the backend stubs too) in order; the kernel kills it if we die.
            start_new_session=True,
        )
        return self

    def answers_ready(self) -> bool:
        """Ready to serve and to be watched: its health says ready and its metrics port
        answers. Triton opens the metrics port last, tens of ms after the HTTP one; what
        reads the metrics at once (the drain, the tests' baselines) would take a refused
        connection there for a server gone (seen in a clean-clone CI run, 2026-11-28)."""
        return answers_200(f"http://{self.http_url}/v2/health/ready") and answers_200(
            self.metrics_url
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(
                    f"tritonserver exited (code {code}) before it was ready" + self.log_tail()
                )
            if self.answers_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s" + self.log_tail())

    @property
    def shm_prefix(self) -> str:
        """The name its Python backend gives its /dev/shm regions: one per port, so the
        files of a server that died by a signal are found (and removed) by the next one."""
        return f"gpt2_triton_{self.ports.http}_"

    def remove_shared_memory(self) -> None:
        """Its /dev/shm regions: a server that shuts down removes its own, one that dies by
        a signal leaves them (~1 MB per model, more once grown). Call when it is gone."""
        for path in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to whatever of its process group is left (stubs included);
        then the shared-memory files it noted and left behind."""
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM, timeout)
        self.remove_shared_memory()
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file or not self.log_file.is_file():
            return ""
        tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- tritonserver log (last lines) ---\n" + "\n".join(tail)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def answers_200(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s (False for a refused or failed request)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
