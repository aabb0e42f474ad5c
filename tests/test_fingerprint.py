"""Content fingerprints, and the checks built on them: a TensorRT plan is refused when the
ONNX files it came from have changed."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from gpt2_triton import checkpoint, fingerprint
from gpt2_triton.errors import EngineError, Gpt2TritonError


def write(folder, files: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_file_hash_is_streamed_in_chunks_and_equals_the_whole_file_hash(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000  # 256 kB
    path = write(tmp_path, {"w.bin": data}) / "w.bin"
    monkeypatch.setattr(fingerprint, "CHUNK_BYTES", 4096)
    assert fingerprint.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_checkpoint_fingerprint_covers_weights_config_and_tokenizer_only(tmp_path):
    folder = write(
        tmp_path / "ckpt",
        {
            "model.safetensors": b"weights",
            "pytorch_model.bin": b"older weights, not what from_pretrained reads",
            "config.json": b"{}",
            "tokenizer.json": b"{}",
            "merges.txt": b"",
            "metrics.json": b"{}",  # written by finetune: not an input of the export
        },
    )
    first = fingerprint.of_checkpoint(folder)
    inputs = {"model.safetensors", "config.json", "tokenizer.json", "merges.txt"}
    assert set(first["files"]) == inputs
    (folder / "metrics.json").write_bytes(b'{"steps": 2}')
    (folder / "pytorch_model.bin").write_bytes(b"changed")
    assert fingerprint.of_checkpoint(folder) == first
    (folder / "tokenizer.json").write_bytes(b'{"changed": true}')
    assert fingerprint.of_checkpoint(folder)["sha256"] != first["sha256"]


def test_bin_weights_count_when_there_are_no_safetensors(tmp_path):
    folder = write(tmp_path, {"pytorch_model.bin": b"w", "config.json": b"{}"})
    assert fingerprint.weight_files(folder) == ["pytorch_model.bin"]


def test_difference_names_what_changed(tmp_path):
    folder = write(tmp_path, {"model.safetensors": b"a", "config.json": b"{}"})
    old = fingerprint.of_checkpoint(folder)
    assert fingerprint.difference(old, old) == ""
    write(folder, {"model.safetensors": b"b", "vocab.json": b"{}"})
    new = fingerprint.of_checkpoint(folder)
    reason = fingerprint.difference(old, new)
    assert "changed: model.safetensors" in reason and "new: vocab.json" in reason
    assert fingerprint.short(old) in reason and fingerprint.short(new) in reason
    assert "no content fingerprint" in fingerprint.difference(None, new)


def test_tiny_resolves_to_its_folder_and_an_uncached_hub_id_to_nothing(tiny_model):
    spec = checkpoint.resolve("tiny")
    assert checkpoint.local_folder(spec) == tiny_model
    assert checkpoint.fingerprint(spec) == fingerprint.of_checkpoint(tiny_model)
    assert checkpoint.fingerprint(checkpoint.resolve("no-such-org/no-such-model")) is None


# -- the TensorRT plan: its engine_settings.json records the ONNX it was built from --------
def fake_plan(export, **settings):
    """What make engine leaves beside the export (the plan itself is never loaded here)."""
    from build_scripts.build_engine import ONNX_FINGERPRINT, onnx_fingerprint

    (export / "model.plan").write_bytes(b"placeholder, not a TensorRT plan")
    recorded = {"tensorrt_version": "none", ONNX_FINGERPRINT: onnx_fingerprint(export)}
    (export / "engine_settings.json").write_text(json.dumps(recorded | settings))


def test_plan_is_refused_once_its_onnx_changed(tmp_path):
    from build_scripts.build_engine import check_plan, plan_stale_reason

    export = write(tmp_path, {"model.onnx": b"graph", "model.onnx.data": b"weights"})
    fake_plan(export)
    assert plan_stale_reason(export) == ""
    check_plan(export)
    (export / "model.onnx.data").write_bytes(b"new weights")  # exported again
    assert "changed: model.onnx.data" in plan_stale_reason(export)
    with pytest.raises(EngineError, match="built from another model.onnx.*make engine"):
        check_plan(export)


def test_trt_repository_refuses_more_sequences_than_the_plan_s_batch(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    fake_plan(export, max_batch=16)
    with pytest.raises(Gpt2TritonError, match="at most 16, MAX_SEQUENCES is 64"):
        build(RepoSettings("tiny", "trt", max_sequences=64), export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    build(RepoSettings("tiny", "trt", max_sequences=16), export, tmp_path / "repo")


def test_plan_without_a_record_cannot_be_checked_and_is_let_through(tmp_path):
    from build_scripts.build_engine import check_plan, plan_stale_reason

    export = write(tmp_path, {"model.onnx": b"graph", "model.onnx.data": b"weights"})
    fake_plan(export, onnx_fingerprint=None)
    assert plan_stale_reason(export) is None
    check_plan(export)  # a warning, not an error: plans from before fingerprints


def test_trt_repository_refuses_a_plan_built_from_another_onnx(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    fake_plan(export)
    repo = build(RepoSettings("tiny", "trt"), export, tmp_path / "repo")
    recorded = json.loads((repo / "build_settings.json").read_text())
    assert (
        recorded["onnx_fingerprint"]["sha256"]
        == fingerprint.of_files(export, ["model.onnx", "model.onnx.data"])["sha256"]
    )
    assert recorded["source_fingerprint"] == checkpoint.fingerprint(checkpoint.resolve("tiny"))
    data = export / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")  # as if exported again
    with pytest.raises(EngineError, match="make engine"):
        build(RepoSettings("tiny", "trt"), export, tmp_path / "repo2")
