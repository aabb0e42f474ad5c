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
