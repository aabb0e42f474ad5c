import json

import pytest

from training import finetune


def test_finetune_lowers_held_out_perplexity(tiny_data, tmp_path):
    out = tmp_path / "ft"
    code = finetune.main(
        [
            "--model",
            "tiny",
            "--train-file",
            str(tiny_data / "train.txt"),
            "--validation-file",
            str(tiny_data / "validation.txt"),
            "--output-dir",
            str(out),
            "--max-steps",
            "20",
            "--block-size",
            "64",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert metrics["steps"] == 20
    # the checkpoint loads like gpt2 and is accepted as MODEL=<folder>
    from gpt2_triton import checkpoint

    spec = checkpoint.resolve(str(out))
    assert checkpoint.load_model(spec).config.model_type == "gpt2"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "not found"),
        (lambda d: (d / "train.txt").write_text("   \n\n"), "empty"),
        (lambda d: (d / "train.txt").write_bytes(b"\xff\xfe\x00bad"), "UTF-8"),
    ],
)
def test_bad_data_file_is_one_clear_line_and_no_output(tiny_data, tmp_path, capsys, setup, message):
    setup(tmp_path)
    out = tmp_path / "ft"
    code = finetune.main(
        [
            "--model",
            "tiny",
            "--train-file",
            str(tmp_path / "train.txt"),
            "--validation-file",
            str(tiny_data / "validation.txt"),
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error:") and message in err[-1]
    assert not out.exists()


def test_missing_checkpoint_and_unknown_option(tmp_path, capsys):
    assert (
        finetune.main(["--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    )
    assert "checkpoint folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--no-such-option"])
    assert exc.value.code == 2


def test_too_little_text_for_one_block(tiny_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("The cat.\n")
    code = finetune.main(
        [
            "--model",
            "tiny",
            "--train-file",
            str(tmp_path / "t.txt"),
            "--validation-file",
            str(tmp_path / "t.txt"),
            "--output-dir",
            str(tmp_path / "ft"),
            "--max-steps",
            "1",
        ]
    )
    assert code == 2 and "shorter than one block" in capsys.readouterr().err
