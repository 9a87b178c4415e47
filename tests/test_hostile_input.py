"""Careless and hostile input, run as a user would: each case a subprocess that ends with one line and exit
code 2 (no traceback), and whatever was saved before it still there, row by row."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_user_error, make_subset, metrics, run_cli, store_rows

TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4"]


@pytest.fixture
def pool(tmp_path, digits):
    return make_subset(tmp_path / "pool", digits, 8, classes=["3", "8"])


def first_run(tmp_path, pool, **kw):
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, "--epochs", "1", "--max-answers", "8", *TINY,
                   "--update-epochs", "1", **kw)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_second_writer_of_a_run_folder_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, pool):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", pool, "--out",
                              str(out), "--epochs", "500", *TINY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could meet it"
        # paused, not ended: it holds the folder as before, and leaves the cores to the runs that meet it
        first.send_signal(signal.SIGSTOP)
        for args in (["--resume"], ["--images", pool, *TINY]):
            proc = run_cli("train_rlhf.py", "--out", out, *args)
            assert_user_error(proc, str(out), f"in use by process {first.pid}")
        rows = store_rows(out)
    finally:
        first.kill()
        first.wait()
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "1", "--max-answers", "4")
    assert proc.returncode == 0, proc.stderr  # the dead process's lock went with it
    assert store_rows(out)[:len(rows)] == rows


def test_a_damaged_store_is_named_with_the_way_to_export_it_and_left_untouched(tmp_path, pool):
    out = first_run(tmp_path, pool)
    db = out / "feedback.sqlite"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) >= 4 * page
    data[3 * page:4 * page] = b"\x55" * page  # one page of the tables, overwritten
    db.write_bytes(bytes(data))
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2")
    assert_user_error(proc, "feedback.sqlite", "damaged", ".recover")
    assert db.read_bytes() == bytes(data)


def test_a_store_locked_by_another_program_stops_with_one_line_and_keeps_every_answer(tmp_path, pool):
    out = first_run(tmp_path, pool)
    before = store_rows(out)
    holder = sqlite3.connect(out / "feedback.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program's write transaction, held
    try:
        proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2", "--max-answers", "12")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_user_error(proc, "feedback.sqlite", "held by another program")
    assert store_rows(out) == before


@pytest.fixture
def tmpfs(tmp_path):
    """A small RAM file system of the size the test asks for (root only; skipped elsewhere)."""
    mounted = []

    def make(size):
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                              check=False)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}): the disk-full cases need root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_disk_full_at_the_start_leaves_no_half_made_run_folder(tmp_path, pool, tmpfs):
    out = tmpfs("2m") / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, "--epochs", "1", *TINY)
    assert_user_error(proc, "reference.pt", "free space")
    assert not out.exists()


def test_a_disk_full_at_the_second_checkpoint_keeps_the_store_and_the_last_good_checkpoint(tmp_path, pool, tmpfs):
    out = tmpfs("400m") / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, "--epochs", "1", "--checkpoint-seconds", "0",
                   *TINY)
    assert_user_error(proc, "checkpoint.pt", "free space", "--resume")
    assert len(store_rows(out)) >= 8
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_relative_image_folder_resumes_from_any_working_folder(tmp_path, pool):
    proc = run_cli("train_rlhf.py", "--images", os.path.relpath(pool, tmp_path), "--out", "run", "--epochs", "1",
                   "--max-answers", "4", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train_rlhf.py", "--out", tmp_path / "run", "--resume", "--epochs", "2", cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_a_write_killed_half_way_leaves_no_temporary_file_after_resume(tmp_path, pool):
    out = first_run(tmp_path, pool)
    stale = out / ".checkpoint.ptq1w2e3r4.tmp"
    stale.write_bytes(b"\0" * 1000)
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and ".checkpoint.ptq1w2e3r4.tmp" in proc.stderr


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path, pool):
    assert_user_error(run_cli("train_rlhf.py", "--images", pool, "--out", tmp_path / "r", *TINY,
                              "--weights", tmp_path / "missing.pth"), "missing.pth")
    assert not (tmp_path / "r").exists()


def test_inference_on_a_missing_file_says_so_in_one_line(tmp_path):
    proc = run_cli("inference.py", tmp_path / "missing.jpg", "--model", tmp_path / "nothing.pt")
    assert_user_error(proc, "missing.jpg does not exist")


@pytest.mark.parametrize("size", [0, "abc"])
def test_a_checkpoint_with_a_nonsense_image_size_is_one_line(tmp_path, size):
    from models import PolicyModel
    torch.save({"policy": PolicyModel(2).state_dict(), "class_names": ["a", "b"], "image_size": size},
               tmp_path / "model.pt")
    (tmp_path / "x.png").write_bytes(b"")
    proc = run_cli("inference.py", tmp_path / "x.png", "--model", tmp_path / "model.pt")
    assert_user_error(proc, "model.pt", "image_size")


def test_sigterm_ends_a_headless_run_after_the_running_update_with_code_143_and_a_saved_checkpoint(tmp_path, pool):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", pool, "--out", str(out),
                             "--epochs", "500", "--checkpoint-every", "0", *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == metrics(out)[-1]["update"]
