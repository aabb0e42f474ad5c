"""End to end, as a user runs it: tiny model -> fine-tune -> export -> verify."""

import json

import pytest


@pytest.mark.slow
def test_tiny_finetune_export_verify(tiny_data, tmp_path, capsys):
    from build_scripts import export_onnx, verify
    from training import finetune

    ft = tmp_path / "ft"

    def train(seed: int) -> int:  # always into the same folder, as `make train` does
        return finetune.main(
            [
                "--model",
                "tiny",
                "--train-file",
                str(tiny_data / "train.txt"),
                "--validation-file",
                str(tiny_data / "validation.txt"),
                "--output-dir",
                str(ft),
                "--max-steps",
                "10",
                "--block-size",
                "64",
                "--seed",
                str(seed),
            ]
        )

    assert train(42) == 0
    # as `make verify` runs it
    assert export_onnx.main(["--model", str(ft), "--int8", "--skip-existing"]) == 0
    code = verify.main(["--model", str(ft), "--output", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    fp32 = next(e for e in report["engines"] if e["precision"] == "fp32" and e["gated"])
    assert fp32["passed"] and fp32["prompts"] >= 32
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_logit_diff"] <= 1e-3
    assert fp32["greedy_identical"] == fp32["greedy_identical_batched"] == 32
    assert any(e["precision"].startswith("int8") for e in report["engines"])
    assert "| onnxruntime | fp32 |" in (tmp_path / "report" / "report.md").read_text()

    # Trained again into the same folder: the export must follow the new weights (it
    # used to be kept, being "already exported", and verify compared against old weights).
    assert train(7) == 0
    assert export_onnx.main(["--model", str(ft), "--skip-existing"]) == 0
    code = verify.main(["--model", str(ft), "--output", str(tmp_path / "report2")])
    assert code == 0, capsys.readouterr().out


def test_verify_fails_when_fp32_onnx_disagrees(tiny_export, tmp_path, monkeypatch):
    """A corrupted export must turn the report red (exit 1), not pass quietly."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from build_scripts import verify

    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)  # copies: onnx.load reads no hard-linked weights
    model = onnx.load(str(bad / "model.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest).copy()
    weights += np.random.default_rng(0).normal(0, 0.5, weights.shape).astype(weights.dtype)
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(bad / "model.onnx"))
    code = verify.main(
        ["--model", "tiny", "--export-dir", str(bad), "--output", str(tmp_path / "r")]
    )
    assert code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not report["engines"][0]["passed"]
