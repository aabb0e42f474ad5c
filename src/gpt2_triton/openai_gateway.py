"""The OpenAI-compatible gateway (``api/``) as a child process of the service.

It runs beside Triton behind the same front door: Envoy routes ``/v1/*`` to it, so keys,
sizes and limits apply to it as to Triton's own paths. It calls Triton at ``triton_url``:
one replica's loopback port, or the front door's gRPC port when there are several
(``serve.Service`` chooses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from gpt2_triton.process import popen_dying_with_parent, stop_group


class GatewayProcess:
    def __init__(
        self, triton_url: str, port: int, log_file: Path, api_key: str = "", host="127.0.0.1"
    ) -> None:
        self.triton_url = triton_url  # one Triton's gRPC address, or the front door's
        self.port = port
        self.host = host
        self.log_file = Path(log_file)
        self.api_key = api_key  # for its own calls (health, the model's config)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "api",
            "--triton-url",
            self.triton_url,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def start(self) -> GatewayProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "API_KEY": self.api_key}
        with open(self.log_file, "ab") as log:
            self.process = popen_dying_with_parent(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM, timeout)
