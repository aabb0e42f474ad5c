"""The fp16 export (``make engine`` for fp16, ``make verify FP16=1``): the graph a strongly
typed TensorRT (11+) builds an fp16 plan from. Its LayerNorm and softmax must run in fp32 by
explicit casts in the graph, and it must compute what the fp32 export computes, within
fp16's rounding: checked here on the tiny model with ONNX Runtime on the CPU (no TensorRT
needed to check the graph)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, shape_inference

from gpt2_triton.engines.factory import read_shape
from gpt2_triton.engines.onnx_forward import OnnxForward
from gpt2_triton.engines.stateful import StatefulEngine

ROOT = Path(__file__).resolve().parent.parent

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
# fp16 keeps ~3 significant digits: on the tiny model (logits within about +-10) the two
# exports differ by ~4e-3 at most (measured); the bar leaves 5x room for other prompts.
FP16_MAX_ABS_DIFF = 2e-2


@pytest.fixture(scope="module")
def fp16_export(tiny_model, artifacts):
    """The tiny model exported as ``make engine`` does for fp16: TensorRT's export (its own
    folder, opset 18 by default: explicit Softmax nodes) with ``--fp16``."""
    from build_scripts import export_onnx

    return export_onnx.run("tiny", fp16=True, skip_existing=True, tensorrt=True)


def test_asking_for_the_fp16_copy_later_keeps_the_plan(tiny_model, tmp_path):
    """make engine PRECISION=fp32 (no fp16 copy), at another ENGINE_OPSET, then make verify
    FP16=1: the copy is added beside the plan, at the export's own opset; nothing is
    exported again (which would replace the folder, the plan with it)."""
    from build_scripts import export_onnx

    folder = tmp_path / "trt"
    export_onnx.run("tiny", folder, opset=20, tensorrt=True)
    plan = folder / "model.plan"
    plan.write_bytes(b"placeholder, not a TensorRT plan")
    graph = (folder / "model.onnx").stat().st_mtime_ns
    assert export_onnx.run("tiny", folder, skip_existing=True, fp16=True, tensorrt=True) == folder
    settings = export_onnx.load_settings(folder)
    assert settings["opset"] == 20 and settings["files"]["fp16"] == "model.fp16.onnx"
    assert plan.read_bytes() == b"placeholder, not a TensorRT plan"
    assert (folder / "model.onnx").stat().st_mtime_ns == graph  # not exported again
    assert (folder / "model.fp16.onnx").is_file() and (folder / "model.fp16.onnx.data").is_file()
    assert not export_onnx.stale_reason(
        folder, settings["model"], False, 20, settings["source_fingerprint"], fp16=True
    )


def test_tensorrt_export_is_apart_from_onnx_runtimes(fp16_export, tiny_export, tmp_path):
    """An export replaces its whole folder: were TensorRT's (opset 18) and ONNX Runtime's
    (opset 23) one folder, each would delete the other, the plan with it (make engine, then
    make verify). Each has its own, and every step that reads the plan looks there."""
    from build_scripts import export_onnx
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    assert fp16_export == export_onnx.trt_dir("tiny") != tiny_export
    assert export_onnx.load_settings(fp16_export)["opset"] == export_onnx.TENSORRT_OPSET
    assert export_onnx.load_settings(tiny_export)["opset"] == 23
    plan = fp16_export / "model.plan"
    with pytest.raises(Gpt2TritonError, match=f"{plan} not found: run 'make engine'"):
        build(RepoSettings("tiny", "trt"), repository=tmp_path / "repo")
    make = ["make", "-s", "-n", "MODEL=tiny"]
    engine = subprocess.run([*make, "engine"], capture_output=True, text=True, cwd=ROOT)
    assert "export_onnx --model tiny --tensorrt" in engine.stdout, engine.stdout
    # whether TensorRT loads, asked before minutes of export
    assert engine.stdout.index("build_engine --check") < engine.stdout.index("export_onnx")
    check = [sys.executable, "-m", "build_scripts.build_engine", "--check"]
    loads = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, timeout=120)
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_bindings"):
        assert loads.returncode == 0 and "loads" in loads.stdout, loads.stderr
    else:
        assert loads.returncode == 2 and "TensorRT is not installed" in loads.stderr
    verify = subprocess.run([*make, "verify"], capture_output=True, text=True, cwd=ROOT)
    assert "--tensorrt" not in verify.stdout and "--opset 23" in verify.stdout, verify.stdout
    fp16 = subprocess.run([*make, "verify", "FP16=1"], capture_output=True, text=True, cwd=ROOT)
    assert "--tensorrt" in fp16.stdout and "--fp16" in fp16.stdout, fp16.stdout


def _graph_types(path):
    """The graph (no weights) with every tensor's element type, by ONNX's own inference."""
    model = shape_inference.infer_shapes(
        onnx.load(str(path), load_external_data=False), strict_mode=True
    )
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    types |= {v.name: v.type.tensor_type.elem_type for v in graph.output}
    types |= {t.name: t.data_type for t in graph.initializer}
    return graph, types


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def test_layernorm_and_softmax_run_in_fp32_between_casts(fp16_export):
    settings = json.loads((fp16_export / "export_settings.json").read_text())
    assert settings["files"]["fp16"] == "model.fp16.onnx"
    graph, types = _graph_types(fp16_export / "model.fp16.onnx")
    producer = {out: node for node in graph.node for out in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    islands = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert Counter(n.op_type for n in islands) == {"LayerNormalization": 5, "Softmax": 2}
    for node in islands:
        assert all(types[name] == FLOAT for name in node.input), node.name
        assert all(types[name] == FLOAT for name in node.output), node.name
        # the activation arrives by an explicit fp16 -> fp32 Cast ...
        cast_in = producer[node.input[0]]
        assert cast_in.op_type == "Cast" and _cast_to(cast_in) == FLOAT
        assert types[cast_in.input[0]] == FLOAT16
        # ... and leaves by an fp32 -> fp16 one, its only consumer
        (cast_out,) = [n for n in graph.node if node.output[0] in n.input]
        assert cast_out.op_type == "Cast" and _cast_to(cast_out) == FLOAT16
        assert consumers[node.output[0]] == 1
    # the rest is fp16: every matmul, the KV cache in and out; the logits leave in fp32
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types[n.output[0]] == FLOAT16 for n in matmuls)
    for value in (*graph.input, *graph.output):
        want = {"input_ids": 7, "attention_mask": 7, "position_ids": 7, "logits": FLOAT}
        assert value.type.tensor_type.elem_type == want.get(value.name, FLOAT16), value.name


def test_fp16_export_agrees_with_fp32_on_onnx_runtime(fp16_export, tiny_tokenizer):
    """Prompts alone and left-padded together, then decode steps: the engines the server
    runs, one on each file. Logits within FP16_MAX_ABS_DIFF; the same top-1 token wherever
    fp32's leader is ahead by more than twice that (nearer ties may flip, as fp16 rounds)."""
    from gpt2_triton.prompts import varied_prompts

    shape = read_shape(fp16_export)
    fp32 = StatefulEngine(OnnxForward(fp16_export / "model.onnx", shape, 1), shape, 8)
    fp16 = StatefulEngine(OnnxForward(fp16_export / "model.fp16.onnx", shape, 1), shape, 8)
    assert fp16.forward.kv_ops.dtype == np.float16  # the cache stays fp16 between steps
    prompts = [tiny_tokenizer(p)["input_ids"] for p in varied_prompts(7)]
    prompts.append((prompts[0] * 1024)[: shape.max_positions - 8])  # near the window's end
    ids = list(range(1, len(prompts) + 1))
    got32 = fp32.step(prompts, ids, [True] * len(ids))
    got16 = fp16.step(prompts, ids, [True] * len(ids))
    steps = [(got32, got16)]
    for _ in range(8):
        tokens = [[int(row.argmax())] for row in got32]
        got32, got16 = fp32.step(tokens, ids), fp16.step(tokens, ids)
        steps.append((got32, got16))
    for a, b in steps:
        assert np.abs(a - b).max() <= FP16_MAX_ABS_DIFF
        top2 = np.sort(a, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * FP16_MAX_ABS_DIFF
        assert (a.argmax(-1) == b.argmax(-1))[clear].all()


def test_fused_attention_asks_for_an_fp32_softmax(tiny_export, tmp_path):
    """Opset 23 fuses each attention into one node with its softmax inside, where no Cast
    reaches: the node's own softmax_precision says fp32; LayerNorm keeps its casts."""
    from gpt2_triton.export import export_fp16

    # copies, not the fixture's files: those may be hard-linked into a model repository,
    # and ONNX refuses to read external data through a file with several links
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(tiny_export / name, tmp_path / name)
    export_fp16(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")
    graph, types = _graph_types(tmp_path / "model.fp16.onnx")
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == read_shape(tiny_export).num_layers
    for node in attention:
        assert {a.name: a.i for a in node.attribute}["softmax_precision"] == FLOAT
        assert types[node.input[0]] == FLOAT16
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types[name] == FLOAT for n in norms for name in n.input)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.fp16.onnx"))
    assert {i.type for i in session.get_inputs()[3:]} == {"tensor(float16)"}


def test_verify_reports_the_fp16_export(fp16_export, tiny_export, tmp_path):
    """make verify FP16=1: the fp16 file (found in TensorRT's export) is reported next to
    fp32 (ONNX Runtime's), not gated."""
    from build_scripts import verify

    reports, out = verify.run("tiny", tiny_export, tmp_path / "v", 32, 4, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt_export_dir"] == str(fp16_export)
    row = next(r for r in reports if r.precision.startswith("fp16 export"))
    assert not row.gated and row.prompts == 32
    assert row.max_abs_logit_diff <= FP16_MAX_ABS_DIFF
    assert row.top1_agreement >= 0.9  # ties flip in fp16: reported, not required
    assert "fp16 export, LayerNorm/softmax fp32 (CPU)" in (out / "report.md").read_text()
    assert next(r for r in reports if r.gated).passed  # fp32 still meets its bar
