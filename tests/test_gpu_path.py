"""The GPU path, as far as it runs without TensorRT or a GPU: clear refusals, profile
arithmetic, the TensorRT 10 / 11 build selection, rendered configs, the compose file and
the GPU check script."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.trt_profiles import PROFILE_NAMES, optimization_profiles, profile_for
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


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_the_bindings_only_wheel_is_found_under_its_own_name(monkeypatch):
    """docker/install_tensorrt.sh installs TensorRT's bindings-only wheel, whose module is
    `tensorrt_bindings`; a stand-in module object is enough to check the import finds it."""
    from gpt2_triton.engines.trt_forward import import_tensorrt

    bindings = SimpleNamespace(__version__="11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", bindings)
    assert import_tensorrt() is bindings


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
    assert tuple(profiles) == PROFILE_NAMES == ("decode", "prefill")
    for ranges in profiles.values():
        assert set(ranges) == {"input_ids", "position_ids", "attention_mask", *SHAPE.past_names()}
        for low, opt, high in ranges.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
            assert low[0] == 1 and high[0] == max_batch  # the batch axis, everywhere
        # Every corner is a shape the network can run: the mask spans past + new tokens,
        # and that never exceeds the context window.
        for corner in range(3):
            new = ranges["input_ids"][corner][1]
            past = ranges["past_key_values.0.key"][corner][2]
            assert ranges["attention_mask"][corner][1] == past + new <= SHAPE.max_positions
            assert ranges["position_ids"][corner] == ranges["input_ids"][corner]
        assert ranges["attention_mask"][2][1] == SHAPE.max_positions
    decode, prefill = profiles["decode"], profiles["prefill"]
    assert decode["input_ids"][2][1] == 1
    assert decode["past_key_values.0.key"][2][2] == SHAPE.max_positions - 1
    assert prefill["input_ids"][2][1] == SHAPE.max_positions
    assert prefill["past_key_values.0.key"][2][2] == 0


def test_every_step_the_engine_sends_has_a_profile():
    assert profile_for(1, 0) == "decode"  # a one-token prompt
    assert profile_for(1, SHAPE.max_positions - 1) == "decode"
    assert profile_for(7, 0) == profile_for(SHAPE.max_positions, 0) == "prefill"
    # several tokens on a cache: no profile holds it (the server never sends it)
    with pytest.raises(EngineError, match="one per step"):
        profile_for(2, 5)


@dataclass
class _FixedBatchForward:
    """Stands in for a forward built for a largest batch (a TensorRT plan)."""

    max_batch: int
    name: str = "trt"


def test_a_repository_larger_than_the_plan_is_refused_with_the_fix():
    from gpt2_triton.engines.stateful import StatefulEngine

    StatefulEngine(_FixedBatchForward(16), SHAPE, max_sequences=16)
    with pytest.raises(EngineError, match=r"MAX_SEQUENCES=32\).*MAX_SEQUENCES=16"):
        StatefulEngine(_FixedBatchForward(16), SHAPE, max_sequences=32)


@pytest.mark.parametrize(
    ("version", "precision", "onnx_file", "flags", "pinned"),
    [
        ("10.5.0", "fp16", "model.onnx", ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True),
        ("10.13.3.9", "fp32", "model.onnx", (), False),
        ("11.0.0.114", "fp16", "model.fp16.onnx", (), False),
        ("11.4.0.106", "fp32", "model.onnx", (), False),
        ("12.0.0", "fp16", "model.fp16.onnx", (), False),
    ],
)
def test_build_mode_follows_the_installed_tensorrt(version, precision, onnx_file, flags, pinned):
    from build_scripts.build_engine import build_mode

    mode = build_mode(version, precision)
    assert (mode.onnx_file, mode.builder_flags, mode.pin_fp32_layers) == (onnx_file, flags, pinned)


def _tensorrt_module(version: str, builder_flags: list[str]) -> SimpleNamespace:
    """The two attributes of the tensorrt module the flag selection reads; nothing built."""
    return SimpleNamespace(
        __version__=version, BuilderFlag=SimpleNamespace(**{f: f for f in builder_flags})
    )


@dataclass
class _RecordingConfig:
    flags: list = field(default_factory=list)

    def set_flag(self, flag) -> None:
        self.flags.append(flag)


# BuilderFlag members of each major version that matter here: TensorRT 11 dropped the
# weak-typing flags (its Python bindings' own enum, 11.4).
TRT10_FLAGS = ["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "REFIT", "STRIP_PLAN"]
TRT11_FLAGS = ["REFIT", "STRIP_PLAN", "SPARSE_WEIGHTS", "VERSION_COMPATIBLE"]


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_builder_flags_exist_in_the_tensorrt_that_sets_them(precision):
    from build_scripts.build_engine import build_mode, set_builder_flags

    for version, flags in (("10.13.3.9", TRT10_FLAGS), ("11.4.0.106", TRT11_FLAGS)):
        trt, config = _tensorrt_module(version, flags), _RecordingConfig()
        set_builder_flags(config, trt, build_mode(trt.__version__, precision))
        expected = ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        assert config.flags == (expected if precision == "fp16" and flags is TRT10_FLAGS else [])


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
    assert (
        'key: "max_active", value: { string_value: "8" }'
        in (repo / "gpt2" / "config.pbtxt").read_text()
    )
    # In process, gpt2 holds the only copy of the plan; the engine model holds none.
    assert 'key: "engine_holder", value: { string_value: "gpt2" }' in config
    assert (repo / "gpt2" / "1" / "engine" / "model.plan").is_file()
    assert not (repo / "engine" / "1" / "model.plan").exists()
    # By BLS, the engine model holds it and gpt2 none.
    bls = build(RepoSettings("tiny", "trt", engine_placement="bls"), export, tmp_path / "repo_bls")
    assert 'string_value: "self"' in (bls / "engine" / "config.pbtxt").read_text()
    assert (bls / "engine" / "1" / "model.plan").is_file()
    assert not (bls / "gpt2" / "1" / "engine").exists()


@pytest.mark.parametrize(
    ("engine", "device", "placement", "holder"),
    [
        ("onnx", "cpu", "in_process", "gpt2"),  # the engine model passes steps on to gpt2
        ("torch", "cpu", "in_process", "gpt2"),
        ("torch", "cuda", "in_process", "gpt2"),
        ("torch", "cuda", "bls", "self"),
        ("trt", "cpu", "in_process", "gpt2"),  # the device a TensorRT plan runs on: cuda
        ("trt", "cpu", "bls", "self"),
        ("onnx", "cpu", "bls", "self"),
    ],
)
def test_one_copy_of_the_engine_per_server(engine, device, placement, holder):
    from build_scripts.build_repo import RepoSettings

    settings = RepoSettings("tiny", engine, device=device, engine_placement=placement)
    assert settings.engine_holder == holder


COMPOSE_SETTINGS = ("MODEL", "MAX_SEQUENCES", "GPU_ENGINE", "TRITON_IMAGE", "API_KEY", "ADMIN_KEY")


def _compose(*args: str) -> str:
    if not shutil.which("docker-compose"):
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: make test-tools installs it")
        pytest.skip("no docker-compose (apt-get install docker-compose)")
    # the file's own defaults, not this shell's settings (GPU_ENGINE=torch make ...)
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SETTINGS}
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
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


def _k8s_grace_period_s(manifest: str) -> int:
    (deployment,) = [
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy/k8s/base" / manifest).read_text())
        if doc and doc.get("kind") == "Deployment"
    ]
    return deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_stops_triton_as_kubernetes_does(profile):
    """compose stop/down sends SIGKILL after stop_grace_period (10 s unless set): Triton
    gets the time Kubernetes gives it."""
    services = yaml.safe_load(_compose("--profile", profile, "config"))["services"]
    server = services["triton" if profile == "gpu" else "triton-cpu"]
    assert server.get("stop_grace_period") == f"{_k8s_grace_period_s('triton.yaml')}s", server


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_stops_the_front_door_first_and_it_drains(profile):
    """compose has no preStop: the door's launcher drains on SIGTERM (--drain-seconds,
    tests/test_drain.py), within its stop budget (Kubernetes' for the same pod), and the
    door depends on its Triton and the gateway, so compose stops it before them: they
    stop once nothing is in flight through it. One door per profile: a dependency on a
    service of another profile is an error in compose."""
    services = yaml.safe_load(_compose("--profile", profile, "config"))["services"]
    door = services["front-door" if profile == "gpu" else "front-door-cpu"]
    triton = "triton" if profile == "gpu" else "triton-cpu"
    assert set(door["depends_on"]) == {triton, "openai"}
    assert {profile} == set(door["profiles"])
    for name in door["depends_on"]:
        assert profile in services[name]["profiles"], name
    command = door["command"]
    drain_s = float(command[command.index("--drain-seconds") + 1])
    budget_s = int(door["stop_grace_period"].removesuffix("s"))
    assert budget_s == _k8s_grace_period_s("front-door.yaml")
    assert 0 < drain_s <= budget_s - 30  # Envoy's own stop, and the interpreter's start
    assert door["init"] is True  # PID 1 drops a SIGTERM that comes before the handler
    if profile == "cpu":  # reached by the name the gateway and the page use
        assert "front-door" in door["networks"]["default"]["aliases"]


def _run_recorded(
    service: dict, model: str, tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A compose one-shot service's shell script, run for ``model`` in the service's
    environment (``env`` on top) with a python3 that only writes down what it was asked
    to run: the process, and each call's arguments ("-m module --flag ...") in order."""
    recorder = tmp_path / "bin" / "python3"
    recorder.parent.mkdir(exist_ok=True)
    log = tmp_path / f"steps-{model}-{'-'.join(env.values())}"
    log.write_text("")
    recorder.write_text('#!/bin/sh\necho "$@" >> "$STEPS_LOG"\n')
    recorder.chmod(0o755)
    shell, flag, script = service["command"]
    env = {
        **service.get("environment", {}),
        "PATH": f"{recorder.parent}:/usr/bin:/bin",
        "MODEL": model,
        "STEPS_LOG": str(log),
        **env,
    }
    # compose passes "$$" on as "$"; the shell sees "$MODEL"
    out = subprocess.run(
        [shell, flag, script.replace("$$", "$")], env=env, capture_output=True, text=True
    )
    return out, log.read_text().splitlines()


def _steps_run(service: dict, model: str, tmp_path: Path, **env: str) -> list[str]:
    """The python3 modules a compose one-shot service runs for ``model``, in order."""
    out, calls = _run_recorded(service, model, tmp_path, **env)
    assert out.returncode == 0, out.stderr
    return [call.split()[1] for call in calls]


@pytest.mark.parametrize("service", ["build-engine", "prepare-cpu"])
def test_compose_builds_the_tiny_model_before_exporting_it(service, tmp_path):
    """MODEL=tiny on a fresh clone: export_onnx reads a built tiny model (it refuses
    otherwise), so the one-shot builds it first, as deploy/k8s's build-repository.sh."""
    profile = "gpu" if service == "build-engine" else "cpu"
    one_shot = yaml.safe_load(_compose("--profile", profile, "config"))["services"][service]
    tiny = _steps_run(one_shot, "tiny", tmp_path)
    assert tiny[:2] == ["build_scripts.build_tiny", "build_scripts.export_onnx"], tiny
    assert "build_scripts.build_tiny" not in _steps_run(one_shot, "gpt2", tmp_path)


def test_compose_gpu_engine_torch_renders_the_torch_engine_on_cuda_without_an_export(tmp_path):
    """GPU_ENGINE=torch: the engine measured in docs/GPU.md (and k8s's gpu overlay) needs
    no ONNX export and no TensorRT; anything else than trt or torch is refused."""
    one_shot = yaml.safe_load(_compose("--profile", "gpu", "config"))["services"]["build-engine"]
    assert one_shot["environment"]["GPU_ENGINE"] == "trt"  # the default
    out, calls = _run_recorded(one_shot, "tiny", tmp_path, GPU_ENGINE="torch")
    assert out.returncode == 0, out.stderr
    assert [call.split()[1] for call in calls] == [
        "build_scripts.build_tiny",
        "build_scripts.build_repo",
    ]
    assert "--engine torch --device cuda --max-sequences 16" in calls[-1]
    trt = _steps_run(one_shot, "gpt2", tmp_path)
    assert trt == [
        "build_scripts.export_onnx",
        "build_scripts.build_engine",
        "build_scripts.build_repo",
    ]
    out, calls = _run_recorded(one_shot, "gpt2", tmp_path, GPU_ENGINE="onnx")
    assert out.returncode != 0 and "trt or torch" in out.stderr and calls == []


def test_gpu_check_script_parses():
    out = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_engine_build_refuses_an_export_its_tensorrt_cannot_parse(tiny_export):
    from build_scripts.build_engine import check_opset
    from gpt2_triton.errors import EngineError

    check_opset(tiny_export, "10.14.1")  # reads Attention: no error
    with pytest.raises(EngineError, match="make engine ENGINE_OPSET=18"):
        check_opset(tiny_export, "10.5.0")


def test_the_gpu_check_fails_on_errors_or_greedy_text_below_the_floor():
    """It always exited 0: gpu_check.sh's `|| status=1` never saw a failed check."""
    from benchmarks.gpu_check import check_failures

    def result(greedy=8, concurrent=8, errors=()):
        load = [{"concurrency": 1, "errors": []}, {"concurrency": 8, "errors": list(errors)}]
        return {"prompts": 8, "greedy_equal_to_hf_cpu_fp32": greedy,
                "concurrent_equal_to_solo": concurrent, "load": load}  # fmt: skip

    assert check_failures(result()) == []
    assert check_failures(result(greedy=7, concurrent=4)) == []  # fp16 near-ties flip
    assert check_failures(result(greedy=3))[0].startswith("greedy text equal to HF fp32: 3/8")
    assert "concurrent streams" in check_failures(result(concurrent=0))[0]
    assert check_failures(result(errors=["UNAVAILABLE: gone"])) == ["c8: UNAVAILABLE: gone"]
