import json

import onnx

from gpt2_triton.engines.shape import ModelShape


def test_export_contract(tiny_export):
    settings = json.loads((tiny_export / "export_settings.json").read_text())
    shape = ModelShape.from_dict(settings["shape"])
    model = onnx.load(str(tiny_export / "model.onnx"))
    onnx.checker.check_model(model)
    assert settings["opset"] >= 17
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
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
