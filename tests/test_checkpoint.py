import json

import pytest

from gpt2_triton import checkpoint
from gpt2_triton.errors import CheckpointError


def test_tiny_loads_like_gpt2(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "gpt2"
    assert 2 <= model.config.n_layer <= 4
    assert tokenizer.eos_token == "<|endoftext|>"
    # byte-level BPE: any text round-trips, multi-byte characters included
    text = "The café in 東京 ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tiny_greedy_output_is_not_noise(tiny_model, tiny_tokenizer, tiny_hf_model):
    import torch

    ids = tiny_tokenizer("The cat", return_tensors="pt")["input_ids"]
    out = tiny_hf_model.generate(
        ids, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    text = tiny_tokenizer.decode(out[0])
    words = text.replace(".", " ").split()
    vocabulary = set(
        open(tiny_model.parent.parent / "data/tiny/train.txt").read().replace(".", " ").split()
    )
    # every generated word is a corpus word, and sentences end with a full stop
    assert all(w in vocabulary for w in words), text
    assert "." in text


def test_resolve_tiny_and_hub_id(tiny_model):
    assert checkpoint.resolve("tiny").slug == "tiny"
    spec = checkpoint.resolve("openai-community/gpt2")
    assert not spec.is_local and spec.slug == "openai-community--gpt2"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "not found"),
        (lambda d: d, "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json") and d, "malformed"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})) and d,
            "no weights",
        ),
    ],
)
def test_bad_checkpoint_folder_is_a_clear_error(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.resolve(str(folder))


def test_unreachable_hub_names_the_offline_option():
    spec = checkpoint.resolve("gpt2")
    with pytest.raises(CheckpointError, match="MODEL=tiny"):
        checkpoint.load_tokenizer(spec)


def test_two_folders_of_one_name_never_share_their_exports(tiny_model, tmp_path, monkeypatch):
    """Exports are named by the folder's name and where it is: runs/ft and other/ft (or a
    folder named tiny) each get their own, and one folder spelled two ways gets one."""
    import shutil

    monkeypatch.chdir(tmp_path)
    for folder in ("runs/ft", "other/ft", "runs/tiny"):
        shutil.copytree(tiny_model, folder)
    slugs = {checkpoint.resolve(m).slug for m in ("runs/ft", "other/ft", "runs/tiny", "tiny")}
    assert len(slugs) == 4 and "tiny" in slugs
    assert checkpoint.resolve("runs/ft").slug.startswith("ft-")
    assert checkpoint.resolve("runs/ft").name == "ft"  # what clients call it
    assert checkpoint.resolve("./runs/ft").slug == checkpoint.resolve("runs/ft").slug
    assert checkpoint.resolve(str(tmp_path / "runs/ft")).slug == checkpoint.resolve("runs/ft").slug
    assert checkpoint.same_checkpoint("runs/ft", checkpoint.resolve("./runs/ft").source)
    assert not checkpoint.same_checkpoint("other/ft", checkpoint.resolve("runs/ft").source)


def test_a_missing_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint folder not found: runs/typo"):
        checkpoint.resolve("runs/typo")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        checkpoint.resolve("deep/er/path")  # a hub id has one slash at most
    # no runs/ yet (make demo MODEL=runs/ft before make train): a hub id, and the hub's
    # error says there is no such folder either
    (tmp_path / "runs").rmdir()
    spec = checkpoint.resolve("runs/ft")
    assert not spec.is_local
    assert "no folder runs/ft here either" in str(checkpoint._hub_error(spec, OSError("x")))
