"""Session fixtures: the tiny model and its ONNX export, built once into a temporary folder.

Every test runs on the tiny GPT-2 (same architecture and code path as ``gpt2``), built
offline by the project itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from gpt2_triton.checkpoint import ARTIFACTS_ENV

# Chosen before any test module imports code that reads it; removed by the OS's tmp cleaning.
_ARTIFACTS = Path(tempfile.mkdtemp(prefix="gpt2-triton-tests-"))
os.environ[ARTIFACTS_ENV] = str(_ARTIFACTS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    return _ARTIFACTS


@pytest.fixture(scope="session")
def tiny_model(artifacts) -> Path:
    from build_scripts import build_tiny

    return build_tiny.ensure()


@pytest.fixture(scope="session")
def tiny_data(tiny_model) -> Path:
    from build_scripts import build_tiny

    return build_tiny.data_dir()


@pytest.fixture(scope="session")
def tiny_export(tiny_model) -> Path:
    from build_scripts import export_onnx

    return export_onnx.run("tiny", int8=True, skip_existing=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture()
def unused_port() -> int:
    return _free_ports(1)[0]


ADMIN_KEY = "test-admin-key"


def service(repository: Path, log_dir: Path, **front_door):
    """The service as users run it: Triton behind the Envoy front door, on free ports."""
    from gpt2_triton.front_door import FrontDoorSettings
    from gpt2_triton.serve import Service

    http, grpc, triton_http, triton_grpc, metrics, gateway = _free_ports(6)
    settings = FrontDoorSettings(
        http_port=http,
        grpc_port=grpc,
        triton_http_port=triton_http,
        triton_grpc_port=triton_grpc,
        gateway_port=gateway,
        **{"admin_key": ADMIN_KEY, **front_door},
    )
    return Service(repository, settings, metrics_port=metrics, log_dir=log_dir)


@pytest.fixture(scope="session")
def triton(tiny_export, artifacts):
    """The tiny model (ONNX Runtime engine) served by a real tritonserver behind Envoy."""
    from build_scripts.build_repo import RepoSettings, build

    repository = build(
        RepoSettings("tiny", "onnx", max_sequences=16), repository=artifacts / "model_repository"
    )
    with service(repository, artifacts / "logs") as server:
        yield server
