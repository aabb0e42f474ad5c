import contextlib
import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from gpt2_triton import fingerprint
from gpt2_triton.engines.shape import ModelShape


def test_export_contract(tiny_export):
    settings = json.loads((tiny_export / "export_settings.json").read_text())
    shape = ModelShape.from_dict(settings["shape"])
    # the graph only: `make repo` hard-links the weights file, and onnx.load refuses to
    # read external data through a file with several links (ONNX Runtime reads it)
    # (the exporter itself runs onnx.checker with full_check before saving)
    model = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False)
    assert settings["opset"] == 23
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 23
    # one fused Attention node per layer: what makes the decode step cheap
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == shape.num_layers
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    outputs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    for name in shape.past_names():
        assert inputs[name] == ["batch", shape.num_heads, "past_sequence", shape.head_dim]
    assert outputs["logits"] == ["batch", shape.vocab_size]
    assert set(shape.present_names()) <= set(outputs)
    assert (tiny_export / "tokenizer" / "tokenizer.json").is_file()
    assert settings["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    for name in settings["files"].values():  # weights beside the graph, not inside it
        graph = onnx.load(str(tiny_export / name), load_external_data=False)
        big = [t for t in graph.graph.initializer if np.prod(t.dims) * 4 > 1024]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
        assert (tiny_export / f"{name}.data").is_file()


def test_prompt_and_decode_steps_use_the_same_file(tiny_export, tiny_hf_model, tiny_tokenizer):
    import numpy as np
    import torch

    from gpt2_triton.engines.factory import build_engine

    engine = build_engine("onnx", tiny_export)
    ids = tiny_tokenizer("The old man walks to")["input_ids"]
    first = engine.step([ids[:-1]], [1], [True])  # prompt step, empty past
    second = engine.step([ids[-1:]], [1])  # one-token step on the cache
    with torch.no_grad():
        full = tiny_hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(first[0], full[-2], atol=1e-4)
    np.testing.assert_allclose(second[0], full[-1], atol=1e-4)


def test_failed_export_leaves_no_folder(tmp_path, capsys):
    from build_scripts import export_onnx

    out = tmp_path / "onnx"
    assert export_onnx.main(["--model", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_int8_model_quantizes_every_weight_matmul_the_lm_head_too(tiny_export):
    settings = json.loads((tiny_export / "export_settings.json").read_text())
    shape = ModelShape.from_dict(settings["shape"])
    model = onnx.load(str(tiny_export / "model.int8.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    # 4 per layer (qkv, attention out, mlp in, mlp out) + the lm_head
    assert ops.count("MatMulNBits") == 4 * shape.num_layers + 1
    assert "Gemm" not in ops
    constants = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    bits = {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    }
    assert bits == {8}
    assert settings["int8_format"] == 2 and settings["int8_token_embedding"] == "8-bit"
    # strict ONNX tooling reads it: no fp32 typing of the table is left behind
    onnx.shape_inference.infer_shapes(
        onnx.load(str(tiny_export / "model.int8.onnx"), load_external_data=False),
        strict_mode=True,
    )


def load_with_weights(path, scratch):
    """``onnx.load`` with the external weights, from copies: the test suite's repositories
    hard-link the export's files, and onnx refuses to read a weights file with several
    links."""
    from gpt2_triton.export import weights_file

    copy = scratch / path.name
    shutil.copyfile(path, copy)
    shutil.copyfile(weights_file(path), weights_file(copy))
    return onnx.load(str(copy))


def test_int8_token_embedding_is_8_bit_and_looks_up_its_dequantized_rows(tiny_export, tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    settings = json.loads((tiny_export / "export_settings.json").read_text())
    shape = ModelShape.from_dict(settings["shape"])
    hidden = shape.num_heads * shape.head_dim
    model = load_with_weights(tiny_export / "model.int8.onnx", tmp_path)
    (lookup,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    codes, scales = inits[lookup.input[0]], inits[lookup.input[2]]
    assert codes.dtype == np.uint8 and codes.shape == (shape.vocab_size, hidden)
    # no fp32 token table is left in the int8 file
    assert not [a for a in inits.values() if a.dtype == np.float32 and a.shape == codes.shape]
    block = codes.shape[1] // scales.shape[1]
    rows = (codes.astype(np.float32) - 128).reshape(shape.vocab_size, -1, block) * scales[..., None]
    # the fp32 table it came from: within half a step of each block's scale
    fp32 = load_with_weights(tiny_export / "model.onnx", tmp_path)
    (table,) = [
        numpy_helper.to_array(i)
        for i in fp32.graph.initializer
        if tuple(i.dims) == (shape.vocab_size, hidden)
    ]
    error = np.abs(rows.reshape(codes.shape) - table).reshape(shape.vocab_size, -1, block)
    assert (error <= scales[..., None] / 2 + 1e-6).all()
    # ONNX Runtime's kernel reads it as written: the graph's lookup alone, run
    ids = np.array([[0, 5, shape.vocab_size - 1]], np.int64)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "GatherBlockQuantized",
                ["codes", "ids", "scales"],
                ["rows"],
                domain="com.microsoft",
                **{a.name: onnx.helper.get_attribute_value(a) for a in lookup.attribute},
            )
        ],
        "lookup",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 3])],
        [onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(codes, "codes"),
            numpy_helper.from_array(scales, "scales"),
        ],
    )
    opsets = [onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(
        onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    looked_up = session.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(looked_up[0], rows.reshape(codes.shape)[ids[0]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["tied", "hidden 24"])
def test_the_token_embedding_stays_fp32_where_it_cannot_be_quantized_alone(case):
    from onnx import TensorProto, helper, numpy_helper

    from gpt2_triton.export import quantize_token_embedding

    vocab, hidden = 40, 24 if case == "hidden 24" else 32
    table = numpy_helper.from_array(np.ones((vocab, hidden), np.float32), "wte")
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["rows"])]
    if case == "tied":
        nodes.append(helper.make_node("MatMul", ["rows", "wte_t"], ["logits"]))
        nodes.append(helper.make_node("Transpose", ["wte"], ["wte_t"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        initializer=[table],
    )
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert quantize_token_embedding(model, vocab) is False
    assert model.SerializeToString() == before


def test_an_int8_export_of_an_older_format_is_quantized_again_in_place(tiny_export, tmp_path):
    from build_scripts import export_onnx

    settings = json.loads((tiny_export / "export_settings.json").read_text())
    weights = settings[export_onnx.SOURCE_FINGERPRINT]
    assert (
        export_onnx.stale_reason(tiny_export, settings["model"], True, settings["opset"], weights)
        == ""
    )
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    del settings["int8_format"], settings["int8_token_embedding"]  # as written before
    (old / "export_settings.json").write_text(json.dumps(settings))
    (old / "model.plan").write_bytes(b"a TensorRT plan built from model.onnx")
    fp32_before = (old / "model.onnx.data").stat().st_mtime_ns
    int8_before = (old / "model.int8.onnx.data").stat().st_mtime_ns
    reason = export_onnx.stale_reason(old, settings["model"], True, settings["opset"], weights)
    assert reason == "its int8 model is of format 1, not 2"
    # an fp32-only request does not care
    assert export_onnx.stale_reason(old, settings["model"], False, settings["opset"], weights) == ""

    assert export_onnx.run("tiny", old, int8=True, skip_existing=True) == old
    # the int8 files made again, in today's format; everything else where it was
    assert (old / "model.plan").read_bytes() == b"a TensorRT plan built from model.onnx"
    assert (old / "model.onnx.data").stat().st_mtime_ns == fp32_before
    assert (old / "model.int8.onnx.data").stat().st_mtime_ns != int8_before
    mended = json.loads((old / "export_settings.json").read_text())
    assert mended["int8_format"] == 2 and mended["int8_token_embedding"] == "8-bit"
    assert export_onnx.stale_reason(old, settings["model"], True, settings["opset"], weights) == ""
    model = onnx.load(str(old / "model.int8.onnx"), load_external_data=False)
    assert "GatherBlockQuantized" in [n.op_type for n in model.graph.node]
    assert not list(old.glob(".int8-*")) and not list(tmp_path.glob(".int8-*"))


def test_gemm_with_bias_becomes_matmul_plus_add():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gpt2_triton.export import gemms_to_matmuls

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="with_bias"),
            helper.make_node("Gemm", ["y", "w2"], ["z"], name="no_bias", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.eye(3, dtype=np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert gemms_to_matmuls(model.graph) == 1  # transB=1 is left alone
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Gemm"]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)
    np.testing.assert_allclose(after, x @ w + b, rtol=1e-5)


def test_unsupported_opset_is_refused(tiny_model, tmp_path, capsys):
    from build_scripts import export_onnx

    out = tmp_path / "onnx"
    assert export_onnx.main(["--model", "tiny", "--opset", "12", "--output", str(out)]) == 2
    assert "opset 12 not supported" in capsys.readouterr().err
    assert not out.exists()


# -- an export is tied to the exact weights it came from ----------------------------------
ONNX_FILES = ["model.onnx", "model.onnx.data"]  # the graph (small tensors in it) + weights


def perturb(folder, name="transformer.h.0.mlp.c_fc.weight", by=0.5):
    """A second training run into the same folder, in miniature: one tensor changes."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name] + by
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def onnx_last_logits(export_dir, tokenizer, prompt="The old man walks to"):
    """Last-position logits of one prompt, run by ONNX Runtime (the server's engine)."""
    from gpt2_triton.engines.factory import build_engine

    ids = tokenizer(prompt)["input_ids"]
    return build_engine("onnx", export_dir).step([ids], [1], [True])[0]


def torch_last_logits(folder, tokenizer, prompt="The old man walks to"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].numpy()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def export_log():
    """The export step's log lines (a module-scoped fixture cannot use caplog)."""
    logger = logging.getLogger("build_scripts.export_onnx")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def retrained(tiny_model, tiny_tokenizer, tmp_path_factory):
    """`make repo MODEL=<folder>` (export --skip-existing, render), then the checkpoint is
    trained again into the same folder and `make repo` runs again."""
    from build_scripts import export_onnx
    from build_scripts.build_repo import RepoSettings, build

    root = tmp_path_factory.mktemp("retrained")
    ckpt, export, repo = root / "ft", root / "onnx", root / "repo"
    shutil.copytree(tiny_model, ckpt)
    export_onnx.run(str(ckpt), export, skip_existing=True)
    first = {
        "logits": onnx_last_logits(export, tiny_tokenizer),
        "settings": json.loads((export / "export_settings.json").read_text()),
        "onnx": fingerprint.of_files(export, ONNX_FILES),
    }
    build(RepoSettings(str(ckpt), "onnx"), export, repo)
    perturb(ckpt)
    with export_log() as lines:
        export_onnx.run(str(ckpt), export, skip_existing=True)
    return SimpleNamespace(ckpt=ckpt, export=export, repo=repo, first=first, log=lines)


def test_changed_weights_are_exported_again_and_served_logits_change(retrained, tiny_tokenizer):
    assert any(
        "exporting" in line and "model.safetensors" in line and "changed" in line
        for line in retrained.log
    ), retrained.log
    settings = json.loads((retrained.export / "export_settings.json").read_text())
    recorded = settings["source_fingerprint"]
    assert recorded == fingerprint.of_checkpoint(retrained.ckpt)
    assert recorded["sha256"] != retrained.first["settings"]["source_fingerprint"]["sha256"]
    assert set(recorded["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}

    logits = onnx_last_logits(retrained.export, tiny_tokenizer)
    assert np.abs(logits - retrained.first["logits"]).max() > 1e-2  # not the old weights
    expected = torch_last_logits(retrained.ckpt, tiny_tokenizer)  # but the new ones
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_unchanged_checkpoint_is_not_exported_again(retrained):
    from build_scripts import export_onnx

    graph = retrained.export / "model.onnx"
    before = graph.stat().st_ino
    with export_log() as lines:
        export_onnx.run(str(retrained.ckpt), retrained.export, skip_existing=True)
    assert graph.stat().st_ino == before  # the same file: nothing was written
    assert any("already exported" in line for line in lines), lines


def test_rendering_again_serves_the_new_export(retrained):
    from build_scripts.build_repo import RepoSettings, build

    build(RepoSettings(str(retrained.ckpt), "onnx"), retrained.export, retrained.repo)
    new = fingerprint.of_files(retrained.export, ONNX_FILES)
    assert new["files"]["model.onnx.data"] != retrained.first["onnx"]["files"]["model.onnx.data"]
    # hard links or copies: today's files, in gpt2's folder, the only copy (the engine
    # model passes its steps on to gpt2: it holds none)
    assert fingerprint.of_files(retrained.repo / "gpt2/1/engine", ONNX_FILES) == new
    assert not (retrained.repo / "engine/1/model.onnx").exists()
    build_settings = json.loads((retrained.repo / "build_settings.json").read_text())
    assert build_settings["source_fingerprint"] == fingerprint.of_checkpoint(retrained.ckpt)


def test_an_export_older_than_its_checkpoint_is_refused(retrained, tmp_path):
    """Trained again but not exported again: make repo and make verify say so."""
    from build_scripts import verify
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    weights = retrained.ckpt / "model.safetensors"
    saved = weights.read_bytes()
    perturb(retrained.ckpt, "transformer.h.0.ln_1.bias")
    try:
        with pytest.raises(Gpt2TritonError, match="out of date.*changed: model.safetensors"):
            build(RepoSettings(str(retrained.ckpt), "onnx"), retrained.export, tmp_path / "r")
        with pytest.raises(Gpt2TritonError, match="out of date"):
            verify.run(str(retrained.ckpt), retrained.export, tmp_path / "v", 32, 2, 1)
    finally:
        weights.write_bytes(saved)


@pytest.mark.parametrize("kind", ["onnx", "onnx-int8"])
def test_the_served_onnx_engine_writes_its_kv_cache_in_place(tiny_export, tmp_path, kind):
    """The repository's engine folder keeps what the factory reads of the export: served
    from it, the engine is the in-place SlotEngine that in-process benchmarks measure (the
    folder's settings once lost the opset, and every served ONNX engine fell back to the
    padded cache)."""
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.engines.factory import SETTINGS_FILE, build_engine
    from gpt2_triton.engines.slots import SlotEngine

    repository = build(RepoSettings("tiny", kind), tiny_export, tmp_path / "repo")
    folder = repository / "gpt2" / "1" / "engine"
    served = build_engine(kind, folder, max_sequences=2)
    exported = build_engine(kind, tiny_export, max_sequences=2)
    assert isinstance(exported, SlotEngine)
    assert type(served) is type(exported)
    # one source: the export's own settings, a copy (an int8 export rewrites the file)
    copied, source = folder / SETTINGS_FILE, tiny_export / SETTINGS_FILE
    assert copied.read_text() == source.read_text()
    assert copied.stat().st_ino != source.stat().st_ino


def test_an_engine_folder_without_the_opset_is_served_padded_and_says_so(
    tiny_export, tmp_path, caplog
):
    """A repository rendered before its engine folder kept the opset: still served, on the
    padded cache, with a warning that names the fix."""
    import logging
    import shutil

    from gpt2_triton.engines.factory import SETTINGS_FILE, build_engine
    from gpt2_triton.engines.stateful import StatefulEngine

    folder = tmp_path / "engine"
    shutil.copytree(tiny_export, folder)
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    (folder / SETTINGS_FILE).write_text(json.dumps({"shape": settings["shape"]}))
    with caplog.at_level(logging.WARNING, logger="gpt2_triton.engines.factory"):
        engine = build_engine("onnx", folder, max_sequences=2)
    assert isinstance(engine, StatefulEngine)
    assert "padded" in caplog.text and "make repo" in caplog.text


def test_the_response_lanes_setting_reaches_gpt2s_config(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError
    from gpt2_triton.sending import MAX_LANES

    repository = build(RepoSettings("tiny", "onnx", response_lanes=3), tiny_export, tmp_path)
    config = (repository / "gpt2" / "config.pbtxt").read_text()
    assert 'key: "response_lanes", value: { string_value: "3" }' in config
    assert RepoSettings("tiny", "onnx", response_lanes=MAX_LANES).response_lanes == MAX_LANES
    for lanes in (-1, MAX_LANES + 1):  # 0 is the default's: by where the engine runs
        with pytest.raises(
            Gpt2TritonError, match=rf"response-lanes must be in \[1, {MAX_LANES}\], got {lanes}"
        ):
            RepoSettings("tiny", "onnx", response_lanes=lanes)


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", ""])
def test_an_unknown_device_is_refused_when_the_repository_is_rendered(device):
    from build_scripts.build_repo import RepoSettings
    from gpt2_triton.errors import Gpt2TritonError

    with pytest.raises(Gpt2TritonError, match=f"unknown DEVICE={device};"):
        RepoSettings("tiny", "torch", device=device)
    for known in ("cpu", "cuda", "cuda:1"):
        assert RepoSettings("tiny", "torch", device=known).device == known


def test_the_burst_window_reaches_gpt2s_config(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.batcher import MAX_BURST_WINDOW_MS
    from gpt2_triton.errors import Gpt2TritonError

    # by where the engine runs: 6 ms on the CPU, off on a GPU (not measured there)
    assert RepoSettings("tiny", "onnx").burst_window_ms == 6
    assert RepoSettings("tiny", "torch", device="cuda").burst_window_ms == 0
    assert RepoSettings("tiny", "trt").burst_window_ms == 0
    assert RepoSettings("tiny", "trt", burst_window_ms=6).burst_window_ms == 6
    config = build(RepoSettings("tiny", "onnx"), tiny_export, tmp_path) / "gpt2" / "config.pbtxt"
    assert 'key: "burst_window_ms", value: { string_value: "6" }' in config.read_text()
    build(RepoSettings("tiny", "onnx", burst_window_ms=0), tiny_export, tmp_path)
    assert 'key: "burst_window_ms", value: { string_value: "0" }' in config.read_text()
    for window in (-1, MAX_BURST_WINDOW_MS + 1):
        bounds = rf"\[0, {MAX_BURST_WINDOW_MS}\]"
        with pytest.raises(Gpt2TritonError, match=rf"burst-window-ms must be in {bounds}, got"):
            RepoSettings("tiny", "onnx", burst_window_ms=window)


def test_torch_compile_reaches_the_config_and_only_where_graphs_run(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    repository = build(RepoSettings("tiny", "onnx"), tiny_export, tmp_path)
    for model in ("engine", "gpt2"):
        config = (repository / model / "config.pbtxt").read_text()
        assert 'key: "torch_compile", value: { string_value: "0" }' in config
    assert RepoSettings("m", "torch", device="cuda", torch_compile=True).torch_compile
    for refused in (
        {"engine": "onnx"},
        {"engine": "torch", "device": "cpu"},
        {"engine": "torch", "device": "cuda", "cuda_graphs": False},
    ):
        with pytest.raises(Gpt2TritonError, match="torch-compile is for ENGINE=torch DEVICE=cuda"):
            RepoSettings("m", torch_compile=True, **refused)


def test_decode_ahead_reaches_gpt2s_config_and_only_where_it_can_run(tiny_export, tmp_path):
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    repository = build(RepoSettings("tiny", "onnx"), tiny_export, tmp_path / "off")
    assert (
        'key: "decode_ahead", value: { string_value: "0" }'
        in (repository / "gpt2" / "config.pbtxt").read_text()
    )
    repository = build(
        RepoSettings("tiny", "torch", decode_ahead=True), tiny_export, tmp_path / "on"
    )
    assert (
        'key: "decode_ahead", value: { string_value: "1" }'
        in (repository / "gpt2" / "config.pbtxt").read_text()
    )
    assert RepoSettings("m", "torch", device="cuda", decode_ahead=True).decode_ahead
    for refused in (
        {"engine": "onnx"},
        {"engine": "onnx-int8"},
        {"engine": "torch", "engine_placement": "bls"},
        {"engine": "torch", "device": "cuda", "cuda_graphs": False},
    ):
        with pytest.raises(Gpt2TritonError, match="decode-ahead is for ENGINE=torch"):
            RepoSettings("m", decode_ahead=True, **refused)


def test_make_serve_refuses_a_repository_older_than_its_checkpoint(tiny_model, tmp_path):
    """Trained again, never rendered again: make serve would serve the old weights (the
    repository's links reach the old export); it says so and starts nothing."""
    import subprocess
    import sys

    from build_scripts import export_onnx
    from build_scripts.build_repo import RepoSettings, build

    ckpt = tmp_path / "ft"
    shutil.copytree(tiny_model, ckpt)
    export = export_onnx.run(str(ckpt), tmp_path / "onnx")
    repo = build(RepoSettings(str(ckpt), "onnx"), export, tmp_path / "repo")
    assert fingerprint.repository_drift(repo) == ""
    perturb(ckpt)
    assert "changed: model.safetensors" in fingerprint.repository_drift(repo)
    serve = [sys.executable, "-m", "gpt2_triton.serve", "--model-repository", str(repo)]
    out = subprocess.run(serve, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "changed: model.safetensors" in out.stderr and "make repo" in out.stderr
    assert "ALLOW_STALE=1" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_repository_is_not_touched_when_an_input_is_missing(tiny_export, tmp_path):
    """An export without its tokenizer: refused before the repository is touched (it was
    emptied, then failed halfway, leaving a repository that make serve would start)."""
    from build_scripts import export_onnx
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton.errors import Gpt2TritonError

    repo = build(RepoSettings("tiny", "onnx"), tiny_export, tmp_path / "repo")
    before = {p: p.stat().st_ino for p in repo.rglob("*") if p.is_file()}
    broken = tmp_path / "onnx"
    shutil.copytree(tiny_export, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(Gpt2TritonError, match="tokenizer is missing"):
        build(RepoSettings("tiny", "onnx"), broken, repo)
    assert {p: p.stat().st_ino for p in repo.rglob("*") if p.is_file()} == before
    settings = json.loads((broken / "export_settings.json").read_text())
    reason = export_onnx.stale_reason(
        broken, settings["model"], False, settings["opset"], settings["source_fingerprint"]
    )
    assert reason == "its tokenizer is missing"  # make repo exports it again


def test_an_export_is_found_again_from_another_folder_and_others_refused(
    tiny_model, tmp_path, monkeypatch
):
    """Exports and repositories record a folder's absolute path: found again from any
    working folder. Another folder's export serves only the very same content (a copy, the
    checkout mounted elsewhere); one of other weights is said, not served."""
    from build_scripts import export_onnx
    from build_scripts.build_repo import RepoSettings, build
    from gpt2_triton import checkpoint
    from gpt2_triton.errors import Gpt2TritonError

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(tiny_model, project / "runs" / "ft")
    shutil.copytree(tiny_model, elsewhere / "runs" / "ft")
    perturb(elsewhere / "runs" / "ft")  # another runs/ft, other weights
    monkeypatch.chdir(project)
    export = export_onnx.run("runs/ft", tmp_path / "onnx")
    assert export_onnx.load_settings(export)["model"] == str(project / "runs" / "ft")
    repo = build(RepoSettings("runs/ft", "onnx"), export, tmp_path / "repo")

    monkeypatch.chdir(elsewhere)
    ours = checkpoint.resolve(str(project / "runs" / "ft"))
    assert export_onnx.check_current(export, "export it", ours)
    assert fingerprint.repository_drift(repo) == ""  # not elsewhere's runs/ft
    settings = export_onnx.load_settings(export)
    weights = checkpoint.fingerprint(ours)
    assert export_onnx.stale_reason(export, ours.source, False, settings["opset"], weights) == ""
    copy = tmp_path / "copy"
    shutil.copytree(project / "runs" / "ft", copy)
    assert export_onnx.check_current(export, "export it", checkpoint.resolve(str(copy)))
    theirs = checkpoint.resolve("runs/ft")
    with pytest.raises(Gpt2TritonError, match="holds an export of .*, not of runs/ft"):
        export_onnx.check_current(export, "export it", theirs)
    weights = checkpoint.fingerprint(theirs)
    reason = export_onnx.stale_reason(export, theirs.source, False, settings["opset"], weights)
    assert reason.startswith("it was exported from")
