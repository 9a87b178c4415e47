"""Where outputs land when a careless or hostile user points them: over an input or a run's own files, through
links planted in a run folder, onto devices and pipes, into a reader that leaves; and a closed stdin and a lock
held by another program. Each case ends in one line and exit code 2, or in the work done; nothing is replaced."""
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

import inference
import train_rlhf
from conftest import ROOT, assert_user_error, make_subset, metrics, run_cli, user_error_line
from run_folder import RunFolderError, check_own_files, lock_run_dir

TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A trained run folder (8 answers) beside its pool."""
    root = tmp_path_factory.mktemp("outputs")
    pool = make_subset(root / "pool", digits, 8, classes=["3", "8"])
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", root / "run", "--epochs", "1", "--max-answers", "8",
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.fixture
def image(tmp_path, digits):
    """One image file of its own (not a link), to classify."""
    return shutil.copy(os.path.join(digits, "3", sorted(os.listdir(os.path.join(digits, "3")))[0]), tmp_path / "a.png")


def test_an_output_over_an_input_or_a_run_file_is_refused_and_nothing_is_touched(run, image, tmp_path):
    photo = image.read_bytes()
    (tmp_path / "link.json").symlink_to(image)
    # the first of each kind as a user runs it (exit code 2, one line), the others from main() in this process
    assert_user_error(run_cli("inference.py", image, "--model", run, "--csv", image), f"--csv {image}", "is the input")
    for flag, out in (("--json", image), ("--json", tmp_path / "link.json")):
        line = user_error_line("inference.py", image, "--model", run, flag, out)
        assert f"{flag} {out}" in line and "is the input" in line, line
    assert image.read_bytes() == photo
    history = (run / "metrics.jsonl").read_bytes()
    assert_user_error(run_cli("train_rlhf.py", "--out", run, "--export", run / "metrics.jsonl"),
                      "lies in the run folder", str(run))
    for args in (("inference.py", image, "--model", run, "--csv", run / "metrics.jsonl"),
                 ("train_rlhf.py", "--out", run, "--export", f"{run}/exported/")):
        line = user_error_line(*args)
        assert "lies in the run folder" in line and str(run) in line, line
    assert (run / "metrics.jsonl").read_bytes() == history
    assert not (run / "exported").exists()


def test_links_planted_in_a_run_folder_are_refused_and_their_targets_untouched(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    # each of a run's own files that is a link, or a folder or a pipe (named as such: no writable --out would
    # help), is refused: as the user meets it (exit code 2, one line) for a .lock that cannot be opened and for
    # a file found once the folder is locked; the other names by the check that --resume makes after locking
    for name, plant, what, as_user in ((".lock", "link", "a symbolic link", True),
                                       ("metrics.jsonl", "link", "a symbolic link", False),
                                       ("config.json", "link", "a symbolic link", False),
                                       ("feedback.sqlite-wal", "link", "a symbolic link", False),
                                       (".lock", os.mkdir, "not a regular file", False),
                                       ("metrics.jsonl", os.mkfifo, "not a regular file", True)):
        own, aside = run / name, tmp_path / "aside"
        if own.exists():
            own.rename(aside)
        own.symlink_to(victim) if plant == "link" else plant(own)
        try:
            if as_user:
                assert_user_error(run_cli("train_rlhf.py", "--out", run, "--resume", "--epochs", "2", timeout=120),
                                  f"{own} is {what}")
            else:
                with pytest.raises(RunFolderError, match=re.escape(f"{own} is {what}")):
                    # what the .lock's open meets (nothing locked), or the check made after locking
                    lock_run_dir(run) if name == ".lock" else check_own_files(run)
        finally:
            own.rmdir() if own.is_dir() and not own.is_symlink() else own.unlink()
            if aside.exists():
                aside.rename(own)
        assert victim.read_text() == "precious\n"
    # the writability probe never follows a link planted under its old fixed name
    out = tmp_path / "new_run"
    out.mkdir()
    (out / ".write-test").symlink_to(victim)
    assert_user_error(run_cli("train_rlhf.py", "--images", tmp_path / "no_such_folder", "--out", out, *TINY),
                      "no_such_folder")
    assert victim.read_text() == "precious\n"


def test_outputs_onto_devices_and_pipes_are_written_into_never_replaced(run, image, tmp_path):
    link = tmp_path / "null.csv"
    link.symlink_to(os.devnull)
    proc = run_cli("inference.py", image, "--model", run, "--csv", link)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(link) == os.devnull and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    proc = run_cli("inference.py", image, "--model", run, "--csv", "/dev/stdout")
    assert proc.returncode == 0 and proc.stdout.startswith("path,predicted,"), (proc.stdout, proc.stderr)
    fifo = tmp_path / "out.json"  # what `--json >(jq .)` hands over is a pipe like this one
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    proc = run_cli("inference.py", image, "--model", run, "--json", fifo)
    written = reader.communicate(timeout=60)[0]
    assert proc.returncode == 0, proc.stderr
    assert json.loads(written)[0]["path"] == str(image) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    unread = tmp_path / "unread.csv"
    os.mkfifo(unread)
    assert_user_error(run_cli("inference.py", image, "--model", run, "--csv", unread, timeout=120),
                      "no process reads")


def test_a_reader_that_leaves_ends_the_printing_never_the_work(run, image, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` after its line: every write to stdout fails with EPIPE
    try:
        def closed_stdout(script, *args):
            return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                                  stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, text=True,
                                  timeout=300, check=False)
        proc = closed_stdout("inference.py", image, "--model", run, "--csv", tmp_path / "out.csv")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert (tmp_path / "out.csv").read_text().startswith("path,predicted,")
        proc = closed_stdout("train_rlhf.py", "--out", run, "--resume", "--epochs", "2", "--max-answers", "12")
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert metrics(run)[-1]["answers"] == 12  # trained on, and its checkpoint saved at the end
    assert os.path.getmtime(run / "checkpoint.pt") >= os.path.getmtime(run / "metrics.jsonl")


def test_a_closed_stdin_and_a_lock_held_by_another_program_end_in_one_line(run, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_rlhf.py"), *TINY], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0), capture_output=True, text=True,
                          timeout=300, check=False)
    assert_user_error(proc, "data/hymenoptera_data/train is missing")  # the default set, not downloaded
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = os.open(run / ".lock", os.O_RDWR)
    try:
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"process {gone.pid} (train_rlhf.py)\n".encode(), 0)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by this test, a program that names nobody
        proc = run_cli("train_rlhf.py", "--out", run, "--resume", "--epochs", "2")
    finally:
        os.close(lock)
    assert_user_error(proc, str(run), "in use by another program")
    assert str(gone.pid) not in proc.stderr


def test_a_file_name_that_is_not_utf8_is_classified_printed_and_written_as_its_own_bytes(run, image, tmp_path):
    odd = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"  # Latin-1, as old cameras wrote
    os.rename(image, os.fsdecode(odd))
    for flag, out in (("--csv", tmp_path / "out.csv"), ("--json", tmp_path / "out.json"), (None, None)):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), os.fsdecode(odd), "--model",
                               str(run)] + ([flag, str(out)] if flag else []), capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert b"caf\xe9.png" in (out.read_bytes() if flag else proc.stdout)


def test_a_name_or_path_no_folder_can_hold_says_what_is_too_long_and_a_long_valid_name_works(run, image, tmp_path,
                                                                                               monkeypatch):
    # each CLI once as a user runs it (exit code 2, one line); the other cases from its main() in this process
    monkeypatch.chdir(tmp_path)
    too_long, deep = "a" * 300 + ".csv", "/".join(["b" * 200] * 21) + "/out.csv"  # 304 bytes; 4,228 in all
    for flag, out, needles in (("--csv", too_long, ("its name is 304 bytes", "at most 255 bytes here")),
                               ("--json", "é" * 130 + ".json", ("its name is 265 bytes",)),
                               ("--csv", "x/" + "a" * 300 + "/out.csv", ("the folder name aaa", "300 bytes")),
                               ("--csv", deep, ("a path is at most", "pass a shorter path"))):
        if out == too_long:
            proc = run_cli("inference.py", image, "--model", run, flag, out, cwd=tmp_path)
            assert_user_error(proc, flag, *needles, "pass a shorter")
            line = [line for line in proc.stderr.splitlines() if line.startswith("error:")][0]
        else:
            line = user_error_line("inference.py", image, "--model", run, flag, out)
            assert all(n in line for n in (flag, *needles, "pass a shorter")), line
        assert "writable" not in line  # no folder would help
    for out in (too_long, "a" * 300 + "/"):
        needles = ("--export", "is 300 bytes" if out.endswith("/") else "is 304 bytes", "pass a shorter name")
        if out == too_long:
            assert_user_error(run_cli("train_rlhf.py", "--out", run, "--export", out, cwd=tmp_path), *needles)
        else:
            line = user_error_line("train_rlhf.py", "--out", run, "--export", out)
            assert all(n in line for n in needles), line
    line = user_error_line("train_rlhf.py", "--images", run.parent / "pool", "--import-labels", too_long,
                           "--out", tmp_path / "new", *TINY)
    assert all(n in line for n in ("--import-labels", "its name is 304 bytes", "pass a shorter name")), line
    line = user_error_line("train_rlhf.py", "--images", run.parent / "pool", "--out", tmp_path / ("r" * 300), *TINY)
    assert all(n in line for n in ("--out", "is 300 bytes", "pass a shorter name")), line
    assert sorted(os.listdir(tmp_path)) == ["a.png"]
    # 250 bytes is a valid name: written, though the temporary file beside it needs a shorter one
    near = "c" * 250
    assert inference.main([str(image), "--model", str(run), "--csv", near + ".csv"]) == 0
    for out in (near[:-2] + ".jsonl", near + "/"):
        assert train_rlhf.main(["--out", str(run), "--export", out]) == 0
    assert (tmp_path / (near + ".csv")).read_text().startswith("path,predicted,prob_3,prob_8\n")
    rows = [json.loads(line) for line in (tmp_path / (near[:-2] + ".jsonl")).read_text().splitlines()]
    assert len(rows) >= 8 and {r["class"] for r in rows} == {"3", "8"}  # other tests may have added answers
    assert sorted(os.listdir(tmp_path / near)) == ["3", "8"]
    assert sorted(os.listdir(tmp_path)) == sorted(["a.png", near + ".csv", near[:-2] + ".jsonl", near])


def test_an_output_onto_the_model_file_given_is_refused_and_the_model_kept(run, image, tmp_path):
    model = shutil.copy(run / "checkpoint.pt", tmp_path / "standalone.pt")
    saved = open(model, "rb").read()
    for flag in ("--csv", "--json"):
        assert_user_error(run_cli("inference.py", image, "--model", model, flag, model), f"{flag} {model}",
                          "is the input")
    assert open(model, "rb").read() == saved
