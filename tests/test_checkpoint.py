"""Run files are written atomically, and what a killed write leaves behind is cleaned at resume."""
import os

from checkpoint import _atomic_write, atomic_write_json, load_checkpoint, save_checkpoint
from run_folder import remove_stale_temp_files


def killed_during_write(path):
    """What a `kill -9` in the middle of writing path leaves: a half-written temporary file."""
    pid = os.fork()
    if pid == 0:
        _atomic_write(str(path), lambda f: (f.write(b"half a checkpoint"), f.flush(), os._exit(0)))
    os.waitpid(pid, 0)


def test_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    save_checkpoint(str(tmp_path / "checkpoint.pt"), {"step": 3})
    atomic_write_json(str(tmp_path / "config.json"), {"lr": 1})
    killed_during_write(tmp_path / "checkpoint.pt")
    killed_during_write(tmp_path / "config.json")
    for name in (".notes.tmp", "plan.tmp", ".hidden", "feedback.sqlite"):
        (tmp_path / name).write_text("a user's file")
    stale = sorted(n for n in os.listdir(tmp_path) if n.startswith((".checkpoint.pt", ".config.json")))
    assert len(stale) == 2
    assert remove_stale_temp_files(str(tmp_path)) == stale
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".hidden", ".notes.tmp", "checkpoint.pt", "config.json", "feedback.sqlite", "plan.tmp"])
    assert remove_stale_temp_files(str(tmp_path)) == []
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 3
