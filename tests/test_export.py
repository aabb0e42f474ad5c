import json

import numpy as np
import onnx

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
