"""atomic_dir: an output folder written all at once, readable by others, and no hidden
copies left by steps that were killed."""

from __future__ import annotations

import fcntl
import stat
from pathlib import Path

import pytest

from gpt2_triton.atomic import atomic_dir


def test_leftovers_of_killed_writers_go_and_a_live_writers_stay(tmp_path):
    """A writer holds a lock beside its partial folder: the next writer removes the
    folders whose lock nobody holds, and only this output's."""
    final = tmp_path / "model"
    killed = tmp_path / ".model.partial-abc123"  # its lock file there, held by nobody
    older = tmp_path / ".model.partial-k2j3h4g5"  # from before locks: none
    writing = tmp_path / ".model.partial-def456"
    nested = tmp_path / ".model.partial-x.partial-ghi789"  # output "model.partial-x"'s
    other = tmp_path / ".model2.partial-jkl012"  # output "model2"'s
    for folder in (killed, older, writing, nested, other):
        folder.mkdir()
        (folder / "weights").write_bytes(b"x")
    for folder in (killed, writing, nested, other):
        Path(f"{folder}.lock").touch()
    with open(f"{writing}.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another writer at work (a separate open file)
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text("{}")
            assert Path(f"{tmp}.lock").is_file()  # its own lock, beside it
    assert (final / "config.json").is_file()
    assert not killed.exists() and not Path(f"{killed}.lock").exists() and not older.exists()
    assert writing.exists() and nested.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")) == [
        writing.name,
        f"{writing.name}.lock",
        nested.name,
        f"{nested.name}.lock",
    ]


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
