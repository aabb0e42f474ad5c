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


@pytest.mark.parametrize("option", [["--block-size", "1"], ["--block-size", "-1"]])
def test_a_block_with_nothing_to_predict_is_refused_before_loading(tmp_path, capsys, option):
    out = tmp_path / "ft"
    assert (
        finetune.main(["--model", str(tmp_path / "nope"), "--output-dir", str(out), *option]) == 2
    )
    assert "--block-size must be 0 (the model's context) or >= 2" in capsys.readouterr().err
    assert not out.exists()


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
    assert code == 2 and "gives no whole block of" in capsys.readouterr().err


def hand_perplexity(model_dir, text_file, block_size: int) -> float:
    """exp(summed NLL of every predicted token / their number), blocks as finetune cuts
    them (the lines' tokens concatenated, the tail shorter than a block dropped)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lines = text_file.read_text(encoding="utf-8").splitlines(keepends=True)
    ids = [t for line in lines for t in tokenizer(line)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)
    nll, predicted = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(block[None]).logits[0, :-1].double()  # position t predicts t + 1
            logp = torch.log_softmax(logits, -1)
            nll -= logp.gather(1, block[1:, None]).sum().item()
            predicted += block_size - 1
    return math.exp(nll / predicted)


def test_reported_perplexity_is_token_weighted(tiny_model, tiny_data, tmp_path):
    # The Trainer's eval_loss divides by B x L tokens where B x (L - 1) are predicted: its
    # perplexity read 2.8826 here instead of 2.9314 (= 2.8826 ** (64 / 63)).
    out = tmp_path / "ft"
    args = ["--model", "tiny", "--output-dir", str(out), "--max-steps", "1"]
    args += ["--train-file", str(tiny_data / "train.txt")]
    args += ["--validation-file", str(tiny_data / "validation.txt"), "--block-size", "64"]
    assert finetune.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before = hand_perplexity(tiny_model, tiny_data / "validation.txt", 64)
    after = hand_perplexity(out, tiny_data / "validation.txt", 64)
    assert metrics["perplexity_before"] == pytest.approx(before, rel=1e-4)
    assert metrics["perplexity_after"] == pytest.approx(after, rel=1e-4)
    assert metrics["validation_tokens_predicted"] == metrics["validation_blocks"] * 63


@pytest.mark.parametrize(
    "cuda, capability, expected",
    [
        (False, None, "none"),
        (True, (7, 0), "fp16"),  # V100: bf16 only emulated
        (True, (7, 5), "fp16"),  # T4: idem, though torch.cuda.is_bf16_supported() says yes
        (True, (8, 0), "bf16"),  # A100
        (True, (8, 9), "bf16"),  # L4
        (True, (9, 0), "bf16"),  # H100
    ],
)
def test_bf16_only_where_the_gpu_runs_it_natively(cuda, capability, expected):
    assert finetune.mixed_precision(cuda, capability) == expected


@pytest.mark.parametrize(
    "model, recipe",
    [
        ("gpt2", finetune.RUN_CLM),
        ("openai-community/gpt2", finetune.RUN_CLM),
        ("runs/ft", finetune.RUN_CLM),  # a checkpoint folder is a pretrained model too
        ("tiny", finetune.TINY_RECIPE),
        (" tiny ", finetune.TINY_RECIPE),
    ],
)
def test_default_recipe_follows_the_model_kind(model, recipe):
    assert finetune.default_recipe(model) == recipe


def test_pretrained_default_is_run_clm_and_tiny_keeps_its_own():
    # run_clm (TrainingArguments defaults): what the published ~20 perplexity of gpt2 on
    # wikitext-2-raw-v1 was trained with
    clm = finetune.choose_recipe(finetune.parse_args(["--model", "gpt2"]))
    assert (clm.learning_rate, clm.lr_scheduler, clm.warmup_steps) == (5e-5, "linear", 0)
    assert (clm.epochs, clm.weight_decay, clm.overridden) == (3.0, 0.0, ())
    tiny = finetune.choose_recipe(finetune.parse_args(["--model", "tiny"]))
    assert (tiny.learning_rate, tiny.lr_scheduler, tiny.epochs, tiny.weight_decay) == (
        5e-4,
        "cosine",
        1.0,
        0.01,
    )


def test_explicit_flags_override_the_recipe():
    args = ["--model", "gpt2", "--learning-rate", "1e-4", "--lr-scheduler", "cosine"]
    args += ["--warmup-steps", "100", "--weight-decay", "0.0"]  # equal to the default: still set
    recipe = finetune.choose_recipe(finetune.parse_args(args))
    assert recipe == finetune.Recipe(
        "run_clm",
        learning_rate=1e-4,
        lr_scheduler="cosine",
        warmup_steps=100,
        epochs=3.0,  # not given: the recipe's
        weight_decay=0.0,
        overridden=("learning_rate", "lr_scheduler", "warmup_steps", "weight_decay"),
    )
    epochs = finetune.choose_recipe(finetune.parse_args(["--model", "tiny", "--epochs", "2"]))
    assert epochs.epochs == 2.0 and epochs.learning_rate == 5e-4


def test_run_saves_the_settings_it_trained_with(tiny_data, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["--model", "tiny", "--output-dir", str(out), "--max-steps", "2"]
    args += ["--train-file", str(tiny_data / "train.txt")]
    args += ["--validation-file", str(tiny_data / "validation.txt"), "--block-size", "64"]
    assert finetune.main([*args, "--lr-scheduler", "constant", "--warmup-steps", "1"]) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings == {
        "name": "tiny",
        "learning_rate": 5e-4,
        "lr_scheduler": "constant",
        "warmup_steps": 1,
        "epochs": None,  # max_steps ends the run: the recipe's epochs are not what ran
        "weight_decay": 0.01,
        "overridden": ["lr_scheduler", "warmup_steps"],
        "batch_size": 8,
        "max_steps": 2,
        "seed": 42,
    }
    epochs_run = json.loads((out / "metrics.json").read_text())["epochs_run"]
    assert 0 < epochs_run < 1  # two steps of the tiny corpus's blocks
    bad = ["--output-dir", str(tmp_path / "bad"), "--lr-scheduler", "warm"]
    assert finetune.main(["--model", "tiny", *bad]) == 2
    assert "--lr-scheduler must be one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_run_replaces_an_earlier_run_but_nothing_else(tiny_data, tmp_path, capsys, monkeypatch):
    """A run replaces its folder whole: an earlier run's, yes; a folder of other files only
    with --overwrite; the working folder (or one above it) never. Refused before training."""
    data = ["--train-file", str(tiny_data / "train.txt")]
    data += ["--validation-file", str(tiny_data / "validation.txt"), "--block-size", "64"]

    def train(output_dir, *more):
        args = ["--model", "tiny", "--output-dir", str(output_dir), "--max-steps", "1"]
        return finetune.main([*args, *data, *more])

    kept = tmp_path / "notes"
    kept.mkdir()
    (kept / "notes.txt").write_text("precious")
    assert train(kept) == 2
    assert "is not a run of this script" in capsys.readouterr().err
    assert (kept / "notes.txt").read_text() == "precious"

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for folder in (".", "..", str(tmp_path)):
        assert train(folder, "--overwrite") == 2
        assert "choose a subfolder" in capsys.readouterr().err
    assert (kept / "notes.txt").read_text() == "precious"

    run = tmp_path / "ft"
    assert train(run) == 0 and train(run) == 0  # a run again into its own folder
    latest = tmp_path / "latest"
    latest.symlink_to(run)  # runs/latest -> exp1: replacing exp1 through it would lose it
    assert train(latest, "--overwrite") == 2
    assert "is a link" in capsys.readouterr().err
    assert (run / "metrics.json").is_file()
    assert train(kept, "--overwrite") == 0
    assert not (kept / "notes.txt").exists() and (kept / "metrics.json").is_file()
