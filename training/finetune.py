"""Fine-tune GPT-2 on Wikitext-2 (or local text) and report perplexity before and after.

    python -m training.finetune --model gpt2 --output-dir runs/ft
    python -m training.finetune --model tiny --train-file a.txt --validation-file b.txt \
        --output-dir runs/ft --max-steps 50

Writes the checkpoint (``save_pretrained``: loads like ``gpt2``) and ``metrics.json`` with
``perplexity_before``, ``perplexity_after`` and the settings the run used into
``--output-dir``, all at once: a failed run leaves no half-written folder behind. Perplexity
is token-weighted: exp of the summed per-token loss over the predicted tokens (L - 1 per
block of L) divided by their number.

Learning rate, schedule, warm-up, epochs and weight decay default to the model's recipe
(:func:`default_recipe`): Hugging Face ``run_clm``'s for a pretrained model, a faster one
for the tiny model; a flag given on the command line always wins.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from gpt2_triton import checkpoint, logs
from gpt2_triton.atomic import atomic_dir, write_json
from gpt2_triton.errors import DataError, Gpt2TritonError

log = logging.getLogger("training.finetune")

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class Recipe:
    """The optimizer and schedule settings a kind of model trains with (AdamW throughout)."""

    name: str
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    epochs: float
    weight_decay: float
    overridden: tuple[str, ...] = ()  # the fields a command-line flag set


# Hugging Face run_clm's settings (its TrainingArguments defaults): the recipe behind the
# published ~20 perplexity of gpt2 on wikitext-2-raw-v1, so a run here compares with it.
RUN_CLM = Recipe("run_clm", 5e-5, "linear", 0, 3.0, 0.0)
# The tiny model was trained from scratch for a few seconds and is far from converged: it
# keeps the larger rate this script always used; one epoch of its corpus stays quick.
TINY_RECIPE = Recipe("tiny", 5e-4, "cosine", 0, 1.0, 0.01)


@dataclass
class FinetuneArgs:
    model: str = field(default="gpt2", metadata={"help": "hub id, 'tiny' or checkpoint folder"})
    output_dir: str = field(default="runs/ft", metadata={"help": "where the checkpoint goes"})
    train_file: str | None = field(
        default=None, metadata={"help": "plain-text training file (default: Wikitext-2)"}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "plain-text validation file (with --train-file)"}
    )
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps"})
    epochs: float | None = field(
        default=None,
        metadata={"help": "epochs when --max-steps is unset (default: the model's recipe)"},
    )
    block_size: int = field(
        default=0, metadata={"help": "tokens per training block (0: the model's context)"}
    )
    batch_size: int = field(default=8, metadata={"help": "per-device batch size"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "peak AdamW learning rate (default: the model's recipe)"}
    )
    lr_scheduler: str | None = field(
        default=None,
        metadata={"help": f"one of {', '.join(SCHEDULES)} (default: the model's recipe)"},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear warm-up steps (default: the model's recipe)"}
    )
    weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW weight decay (default: the model's recipe)"}
    )
    seed: int = field(default=42, metadata={"help": "random seed"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an output folder that is not a run of this script"},
    )

    def __post_init__(self) -> None:
        if self.validation_file and not self.train_file:
            raise DataError("--validation-file needs --train-file")
        if self.train_file and not self.validation_file:
            raise DataError("--train-file needs --validation-file (held-out perplexity)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise DataError("--max-steps must be a positive number of steps")
        if self.epochs is not None and self.epochs <= 0:
            raise DataError("--epochs must be > 0")
        if self.block_size < 0 or self.block_size == 1 or self.batch_size <= 0:
            # a 1-token block has nothing to predict: its loss and perplexity are 0/0
            raise DataError(
                "--block-size must be 0 (the model's context) or >= 2, and --batch-size > 0"
            )
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise DataError("--learning-rate must be > 0")
        if self.lr_scheduler is not None and self.lr_scheduler not in SCHEDULES:
            raise DataError(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}")
        if (self.warmup_steps or 0) < 0 or (self.weight_decay or 0) < 0:
            raise DataError("--warmup-steps and --weight-decay must be >= 0")


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    """The run's folder, resolved; refused before minutes of training when the run would
    replace what it must not. A run replaces its folder whole (atomic_dir): an earlier run
    there (its metrics.json) is replaced, anything else only with ``--overwrite``, and the
    working folder, one above it, the home folder or ``/`` never."""
    given = Path(output_dir).expanduser()
    if given.is_symlink():  # atomic_dir would replace the link, and the run behind it keep
        raise DataError(
            f"--output-dir {output_dir} is a link (to {given.resolve()}): give the folder"
        )
    folder = given.resolve()
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents or folder == Path.home().resolve():
        raise DataError(f"--output-dir {output_dir} would replace {folder}: choose a subfolder")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--output-dir {output_dir} is a file")
    earlier_run = (folder / "metrics.json").is_file()
    if folder.is_dir() and any(folder.iterdir()) and not earlier_run and not overwrite:
        raise DataError(
            f"--output-dir {output_dir} exists and is not a run of this script (no "
            "metrics.json); a run replaces its folder whole: choose another, or give "
            "--overwrite (make train OVERWRITE=1)"
        )
    return folder


def default_recipe(model: str) -> Recipe:
    """The recipe for MODEL: ``tiny`` (as :func:`checkpoint.resolve` recognizes it) keeps
    its own; a pretrained model (hub id or checkpoint folder) gets run_clm's."""
    return TINY_RECIPE if model.strip() == checkpoint.TINY else RUN_CLM


def choose_recipe(args: FinetuneArgs) -> Recipe:
    """The model's recipe with every flag the user gave (not None) put in its place."""
    given = {
        name: getattr(args, name)
        for name in ("learning_rate", "lr_scheduler", "warmup_steps", "epochs", "weight_decay")
        if getattr(args, name) is not None
    }
    return replace(default_recipe(args.model), **given, overridden=tuple(given))


def read_text_file(path: str) -> list[str]:
    """Lines of a UTF-8 text file; an unreadable or empty file is a clear DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {p} as UTF-8 text: {exc}") from exc
    if not text.strip():
        raise DataError(f"data file is empty: {p}")
    return text.splitlines(keepends=True)


def load_texts(args: FinetuneArgs):
    """A ``DatasetDict`` with ``train`` and ``validation`` splits of raw text lines."""
    from datasets import Dataset, DatasetDict, load_dataset

    if args.train_file:
        return DatasetDict(
            train=Dataset.from_dict({"text": read_text_file(args.train_file)}),
            validation=Dataset.from_dict({"text": read_text_file(args.validation_file)}),
        )
    try:
        raw = load_dataset(*WIKITEXT)
    except Exception as exc:  # any hub/network failure means the same to the user
        raise DataError(
            f"cannot load {WIKITEXT[0]}/{WIKITEXT[1]} from the Hugging Face hub "
            f"({type(exc).__name__}). Offline? Pass --train-file and --validation-file"
        ) from exc
    return DatasetDict(train=raw["train"], validation=raw["validation"])


# Lines tokenized, joined and cut into blocks together; each group's remainder is dropped
BLOCK_GROUP_LINES = 2000


def group_into_blocks(texts, tokenizer, block_size: int):
    """Tokenize the raw lines and cut the concatenation into ``block_size`` blocks."""

    def tokenize(batch):
        return tokenizer(batch["text"])

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        usable = (len(ids) // block_size) * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = texts.map(tokenize, batched=True, remove_columns=["text"])
    grouped = tokenized.map(
        group,
        batched=True,
        batch_size=BLOCK_GROUP_LINES,
        remove_columns=tokenized["train"].column_names,
    )
    for split in ("train", "validation"):
        if len(grouped[split]) == 0:
            raise DataError(
                f"the {split} text gives no whole block of {block_size} tokens (blocks are "
                f"cut from every {BLOCK_GROUP_LINES} lines, as run_clm does); give more text "
                "or a smaller --block-size"
            )
    return grouped


def mixed_precision(cuda: bool, capability: tuple[int, int] | None) -> str:
    """``bf16``, ``fp16`` or ``none`` for a device: CUDA or not, and its compute capability.

    bf16 only from compute capability 8.0 (Ampere) on, where it runs natively:
    ``torch.cuda.is_bf16_supported()`` also says yes on a T4 (7.5) or V100 (7.0), where
    bf16 is emulated and slower than fp16.
    """
    if not cuda:
        return "none"
    if capability is not None and capability[0] >= 8:
        return "bf16"
    return "fp16"


def device_precision() -> str:
    import torch

    cuda = torch.cuda.is_available()
    return mixed_precision(cuda, torch.cuda.get_device_capability() if cuda else None)


@dataclass(frozen=True)
class HeldOut:
    loss: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens: every block position but the first

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 50 else float("inf")


def evaluate(trainer) -> HeldOut:
    """Token-weighted held-out loss: summed per-token NLL / number of predicted tokens.

    Not the Trainer's ``eval_loss``: it divides by every label position, B x L per batch,
    though a block of L tokens predicts only L - 1 of them (the first has no context), so
    its perplexity reads low (e^(loss x (L-1)/L)). No autocast here: the metric does not
    depend on the GPU's mixed precision.
    """
    import torch
    import torch.nn.functional as F

    model = trainer.model
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            ids = batch["input_ids"].to(model.device)  # (B, L)
            targets = batch["labels"].to(model.device)[:, 1:]  # (B, L-1): token t+1 for t
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, L-1, V)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,  # the label the Trainer's collators use for padding
                reduction="sum",
            )
            total += nll.item()
            tokens += int((targets != -100).sum())
    return HeldOut(total / tokens, tokens)


def run(args: FinetuneArgs) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    output_dir = check_output_dir(args.output_dir, args.overwrite)
    recipe = choose_recipe(args)
    log.info(
        "recipe %s: learning rate %g, %s schedule, %d warm-up steps, %s, "
        "weight decay %g (set by flags: %s)",
        recipe.name,
        recipe.learning_rate,
        recipe.lr_scheduler,
        recipe.warmup_steps,
        f"{args.max_steps} steps (epochs not used)"
        if args.max_steps > 0
        else f"{recipe.epochs:g} epochs",
        recipe.weight_decay,
        ", ".join(recipe.overridden) or "none",
    )
    spec = checkpoint.resolve(args.model)
    tokenizer = checkpoint.load_tokenizer(spec)
    model = checkpoint.load_model(spec)
    block_size = args.block_size or model.config.n_positions
    block_size = min(block_size, model.config.n_positions)

    blocks = group_into_blocks(load_texts(args), tokenizer, block_size)
    cuda = torch.cuda.is_available()
    precision = device_precision()
    with atomic_dir(output_dir) as tmp:
        training_args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            max_steps=args.max_steps,
            num_train_epochs=recipe.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=recipe.learning_rate,
            warmup_steps=recipe.warmup_steps,
            lr_scheduler_type=recipe.lr_scheduler,
            weight_decay=recipe.weight_decay,
            bf16=precision == "bf16",  # mixed precision on GPU: see mixed_precision()
            fp16=precision == "fp16",
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            use_cpu=not cuda,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=blocks["train"],
            eval_dataset=blocks["validation"],
        )
        before = evaluate(trainer)
        log.info("validation perplexity before: %.4f", before.perplexity)
        result = trainer.train()
        after = evaluate(trainer)
        log.info("validation perplexity after: %.4f", after.perplexity)

        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metrics = {
            "model": spec.source,
            "dataset": args.train_file or "/".join(WIKITEXT),
            "block_size": block_size,
            "train_blocks": len(blocks["train"]),
            "validation_blocks": len(blocks["validation"]),
            "steps": result.global_step,
            "train_loss": result.training_loss,
            # token-weighted: exp(summed NLL / predicted tokens), see evaluate()
            "perplexity_before": before.perplexity,
            "perplexity_after": after.perplexity,
            "validation_loss_before": before.loss,
            "validation_loss_after": after.loss,
            "validation_tokens_predicted": after.tokens,
            "mixed_precision": precision if cuda else "none (CPU)",
            # what the run trained with, so a result can be reproduced and compared
            "settings": asdict(recipe)
            | {"batch_size": args.batch_size, "max_steps": args.max_steps, "seed": args.seed}
            # the Trainer stops at max_steps, whatever the recipe's epochs
            | ({"epochs": None} if args.max_steps > 0 else {}),
            "epochs_run": trainer.state.epoch,
        }
        write_json(tmp / "metrics.json", metrics)
        import shutil

        shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return metrics


def parse_args(argv: list[str] | None = None) -> FinetuneArgs:
    """The command line as :class:`FinetuneArgs`; a recipe flag left out stays None."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(FinetuneArgs)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logs.setup()
    try:
        args = parse_args(argv)
        metrics = run(args)
    except Gpt2TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}; "
        f"checkpoint in {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
