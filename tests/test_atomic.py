"""atomic_dir: an output folder written all at once, readable by others, and no hidden
copies left by steps that were killed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from gpt2_triton.atomic import atomic_dir


def test_leftovers_of_killed_writers_go_and_a_live_writers_stay(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(gone.stdout)  # exited and reaped: no process has it (until reused)
    final = tmp_path / "model"
    killed = tmp_path / f".model.partial-{dead_pid}-abc"
    older = tmp_path / ".model.partial-k2j3h4g5"  # named before writers put their pid in
    writing = tmp_path / f".model.partial-{os.getpid()}-def"
    other = tmp_path / f".model2.partial-{dead_pid}-ghi"  # another output's
    for folder in (killed, older, writing, other):
        folder.mkdir()
        (folder / "weights").write_bytes(b"x")
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").is_file()
    assert not killed.exists() and not older.exists()
    assert writing.exists() and other.exists()


def test_the_output_is_readable_by_others(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        private = tmp / "model.safetensors"
        private.write_bytes(b"weights")
        private.chmod(0o600)  # as safetensors writes it
        (tmp / "tokenizer").mkdir(mode=0o700)
    for path in (final, final / "tokenizer"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o055 == 0o055
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644


def test_a_failed_step_leaves_the_old_output(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("the step failed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (final / "old").read_text() == "kept"
