"""Build the tiny GPT-2: corpus -> byte-level BPE tokenizer -> model -> brief training.

The result is saved with ``save_pretrained`` and loads exactly like ``gpt2`` from the hub
(``AutoTokenizer`` / ``AutoModelForCausalLM``), so every later step runs the same code path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2_triton.atomic import atomic_dir, write_json
from gpt2_triton.tiny import corpus

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinySettings:
    # Small enough to train on two CPU cores in well under a minute, big enough that the
    # BPE merges and a 2-layer attention stack learn the corpus' sentence structure.
    vocab_size: int = 1024
    n_positions: int = 1024  # GPT-2's: long generations behave (and take time) as in gpt2
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    train_paragraphs: int = 1500
    validation_paragraphs: int = 150
    steps: int = 250  # greedy output reads well; held-out perplexity can still drop
    batch_size: int = 16
    block_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


def write_corpus(folder: Path, settings: TinySettings) -> tuple[Path, Path]:
    """Write ``train.txt`` and ``validation.txt`` (different seeds: held-out text)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.txt"
    validation = folder / "validation.txt"
    train.write_text(corpus.generate(settings.train_paragraphs, seed=settings.seed))
    validation.write_text(corpus.generate(settings.validation_paragraphs, seed=settings.seed + 1))
    return train, validation


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        text.splitlines(), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS]
    )
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    # transformers 5: the keywords are vocab=/merges=; the old *_file names are ignored.
    return GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=None)


def _merges(bpe) -> list[tuple[str, str]]:
    import json as _json

    model = _json.loads(bpe._tokenizer.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build(output_dir: Path, data_dir: Path, settings: TinySettings = TinySettings()) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(settings.seed)
    train_file, _ = write_corpus(data_dir, settings)
    text = train_file.read_text()
    tokenizer = train_tokenizer(text, settings.vocab_size)
    tokenizer.model_max_length = settings.n_positions

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)

    # Paragraphs joined by EOS, like GPT-2's pre-training documents.
    ids = []
    for para in text.split("\n\n"):
        ids.extend(tokenizer(para.strip())["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        starts = torch.randint(
            0, len(data) - settings.block_size - 1, (settings.batch_size,), generator=generator
        )
        batch = torch.stack([data[s : s + settings.block_size] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.steps - 1:
            log.info("tiny step %d/%d loss %.3f", step + 1, settings.steps, loss.item())
    model.eval()
    log.info("tiny model trained in %.1f s", time.perf_counter() - started)

    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "tiny_settings.json", asdict(settings))
    return output_dir
