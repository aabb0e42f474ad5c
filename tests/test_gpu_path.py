"""The GPU path, as far as it runs without TensorRT or a GPU: clear refusals, profile
arithmetic, rendered configs, the compose file and the GPU check script."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.trt_profiles import optimization_profiles, profile_for
from gpt2_triton.errors import EngineError

ROOT = Path(__file__).resolve().parent.parent
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SHAPE = ModelShape(
    num_layers=2, num_heads=4, head_dim=16, vocab_size=600, max_positions=1024, eos_token_id=0
)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_make_engine_without_tensorrt_is_one_clear_line(capsys):
    from build_scripts import build_engine

    assert build_engine.main(["--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TensorRT is not installed")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_trt_engine_without_tensorrt_refuses_clearly(tiny_export):
    from gpt2_triton.engines.factory import build_engine

    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_engine("trt", tiny_export)


def test_torch_engine_on_cuda_without_a_gpu_refuses_clearly(tiny_export):
    import torch

    from gpt2_triton.engines.factory import build_forward

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(EngineError, match="no CUDA GPU"):
        build_forward("torch", tiny_export, SHAPE, device="cuda", model=object())


@pytest.mark.parametrize("max_batch", [1, 16, 64])
def test_profiles_are_consistent_with_the_serving_limits(max_batch):
    profiles = optimization_profiles(SHAPE, max_batch)
    assert list(profiles) == ["decode", "general"]
    for ranges in profiles.values():
        assert set(ranges) == {"input_ids", "position_ids", "attention_mask", *SHAPE.past_names()}
        for low, opt, high in ranges.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
            assert low[0] == 1 and high[0] == max_batch  # the batch axis, everywhere
        assert ranges["attention_mask"][2][1] == SHAPE.max_positions
        assert ranges["past_key_values.0.key"][2][2] == SHAPE.max_positions - 1
    assert profiles["decode"]["input_ids"][2][1] == 1
    assert profiles["general"]["input_ids"][2][1] == SHAPE.max_positions
    assert profile_for(1) == "decode" and profile_for(7) == "general"


def test_trt_repository_renders_and_refuses_without_a_plan(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    with pytest.raises(Gpt2TritonError, match="model.plan not found: run 'make engine'"):
        build(RepoSettings("tiny", "trt"), export, tmp_path / "repo")
    # Placeholders stand in for make engine's files: this checks rendering and copying
    # only; nothing loads them.
    (export / "model.plan").write_bytes(b"placeholder, not a TensorRT plan")
    (export / "engine_settings.json").write_text(json.dumps({"tensorrt_version": "none"}))
    repo = build(RepoSettings("tiny", "trt", max_sequences=8), export, tmp_path / "repo")
    config = (repo / "engine" / "config.pbtxt").read_text()
    assert 'string_value: "trt"' in config and 'string_value: "cuda"' in config
    assert 'key: "max_sequences", value: { string_value: "8" }' in config
    assert "${" not in config
    assert (repo / "engine" / "1" / "model.plan").is_file()
    assert (
        'key: "max_active", value: { string_value: "8" }'
        in (repo / "gpt2" / "config.pbtxt").read_text()
    )


def _compose(*args: str) -> str:
    if not shutil.which("docker-compose"):
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: make test-tools installs it")
        pytest.skip("no docker-compose (apt-get install docker-compose)")
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_is_valid_and_safe(profile):
    services = yaml.safe_load(_compose("--profile", profile, "config"))["services"]
    server = services["triton" if profile == "gpu" else "triton-cpu"]
    for service in services.values():
        for port in service.get("ports", []):  # "ip:host:container" or the long form
            host_ip = port.split(":")[0] if isinstance(port, str) else port.get("host_ip")
            assert host_ip == "127.0.0.1", service
    assert server["shm_size"] and server["healthcheck"]["test"]
    assert "ui" in services
    gpu = (server.get("deploy") or {}).get("resources", {}).get("reservations", {})
    if profile == "gpu":
        assert gpu["devices"][0]["capabilities"] == ["gpu"]
        assert services["build-engine"]["deploy"]["resources"]["reservations"]["devices"]
        assert "build_engine" in " ".join(services["build-engine"]["command"])
    else:
        assert not gpu


def test_gpu_check_script_parses():
    out = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_engine_build_refuses_an_export_its_tensorrt_cannot_parse(tiny_export):
    from build_scripts.build_engine import check_opset
    from gpt2_triton.errors import EngineError

    check_opset(tiny_export, "10.14.1")  # reads Attention: no error
    with pytest.raises(EngineError, match="--opset 18"):
        check_opset(tiny_export, "10.5.0")
