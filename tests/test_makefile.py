"""What make passes on: each setting as given, so the step's own check answers (make -n)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_n(*args: str) -> str:
    out = subprocess.run(
        ["make", "-s", "-n", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_a_training_file_without_its_validation_file_reaches_finetunes_check():
    """An empty --validation-file was argparse's 'expected one argument', not finetune's
    '--train-file needs --validation-file (held-out perplexity)'."""
    command = make_n("train", "MODEL=tiny", "TRAIN_FILE=a.txt")
    assert "--train-file a.txt" in command and "--validation-file" not in command
    both = make_n("train", "MODEL=tiny", "TRAIN_FILE=a.txt", "VALIDATION_FILE=b.txt")
    assert "--validation-file b.txt" in both
    assert "--overwrite" not in both and "--overwrite" in make_n("train", "OVERWRITE=1")


def test_device_reaches_make_repo_whatever_the_engine():
    """DEVICE=cuda with ENGINE=onnx rendered a CPU repository without a word; build_repo
    now sees it, and says it is for ENGINE=torch."""
    assert "--device cuda" in make_n("repo", "MODEL=tiny", "ENGINE=onnx", "DEVICE=cuda")
    import pytest

    from build_scripts.build_repo import RepoSettings
    from gpt2_triton.errors import Gpt2TritonError

    with pytest.raises(Gpt2TritonError, match="--device cuda is for ENGINE=torch"):
        RepoSettings("tiny", "onnx", device="cuda")
    assert RepoSettings("tiny", "trt", device="cuda").device == "cuda"  # it is, anyway


def test_make_serve_passes_each_front_door_and_supervisor_setting_given():
    """Each documented make serve setting reaches gpt2_triton.serve, and only when given
    (unset: serve's own defaults)."""
    bare = make_n("serve")
    for flag in ("--max-concurrent-requests", "--requests-per-second", "--no-liveness"):
        assert flag not in bare
    given = make_n(
        "serve", "MAX_CONCURRENT_REQUESTS=8", "REQUESTS_PER_SECOND=50", "LIVENESS=0",
        "ALLOW_STALE=1", "NO_OPENAI=1", "OPEN_TRITON_STATISTICS=1", "REPLICAS=2",
    )  # fmt: skip
    for flag in (
        "--max-concurrent-requests 8",
        "--requests-per-second 50",
        "--no-liveness",
        "--allow-stale",
        "--no-openai",
        "--open-triton-statistics",
        "--replicas 2",
    ):
        assert flag in given, flag
