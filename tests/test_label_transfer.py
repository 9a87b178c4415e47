"""--export and --import-labels as a user runs them: labels out of a run (CSV, JSON lines, an ImageFolder that
torchvision reads back), into a fresh run of the same images (nothing asked again), and every bad input as
one line with exit code 2."""
import csv
import fcntl
import json
import os
import re
import shutil
import sqlite3

import pytest
import torchvision

import train_rlhf
from conftest import assert_user_error, make_subset, metrics, run_cli, store_rows
from dataset import file_sha1, list_image_files
from feedback_store import FeedbackStore
from label_transfer import LabelTransferError, export_labels, read_label_source, run_label_rows, store_label_rows
from user_errors import first_line

TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4"]
CLASSES = ["ants", "bees"]


def labelled_run(tmp_path, pool, *extra):
    """A headless run that answered 10 questions (some skipped)."""
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, "--epochs", "1", "--max-answers", "10",
                   "--feedback-skip", "0.4", *TINY, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def export(run, target, capsys=None):
    """train_rlhf.py --out RUN --export TARGET: as a user runs it, or (given capsys) its main() in this process."""
    if capsys is None:
        proc = run_cli("train_rlhf.py", "--out", run, "--export", target)
        assert proc.returncode == 0, proc.stderr
        stdout = proc.stdout
    else:
        capsys.readouterr()
        assert train_rlhf.main(["--out", str(run), "--export", str(target)]) == 0
        stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 1 and str(target) in stdout, stdout
    return stdout.strip()


def read_table(path):
    with open(path, encoding="utf-8") as f:
        if str(path).endswith(".csv"):
            return list(csv.DictReader(f))
        return [json.loads(line) for line in f]


def answers_by_kind(run):
    """{kind: {sha1: answer}} of a run's stored answers."""
    out = {}
    with sqlite3.connect(os.path.join(run, "feedback.sqlite")) as db:
        for sha1, answer, kind in db.execute("SELECT sha1, answer, kind FROM answers"):
            out.setdefault(kind, {})[sha1] = answer
    return out


def renamed_copy(pool, dest):
    """The pool's images as real files under new names (a moved and renamed collection)."""
    for n, path in enumerate(list_image_files(pool)):
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(dest / cls, exist_ok=True)
        shutil.copy(path, dest / cls / f"renamed_{n:03d}{os.path.splitext(path)[1]}")
    return str(dest)


def test_export_then_import_into_a_fresh_run_gives_the_same_labels_and_asks_none_again(tmp_path, small_pool):
    run = labelled_run(tmp_path, small_pool)
    stored = store_rows(run)
    labels = {sha1: CLASSES[a] for sha1, _, a, _ in stored if a is not None}
    assert 0 < len(labels) < len(stored)  # skips are no labels
    line = export(run, tmp_path / "labels.csv")
    rows = read_table(tmp_path / "labels.csv")
    assert {r["sha1"]: r["class"] for r in rows} == labels and len(rows) == len(labels)
    assert {r["kind"] for r in rows} == {"label"} and all(r["time"] and r["policy_version"] for r in rows)
    by_hash = {sha1: path for sha1, path, _, _ in stored}
    assert all(r["path"] == os.path.relpath(by_hash[r["sha1"]], small_pool) for r in rows)
    assert f"exported {len(labels)} labels" in line

    moved = renamed_copy(small_pool, tmp_path / "moved")
    fresh = tmp_path / "fresh"
    proc = run_cli("train_rlhf.py", "--images", moved, "--out", fresh, "--import-labels", tmp_path / "labels.csv",
                   "--epochs", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    report = [line for line in proc.stdout.splitlines() if line.startswith("--import-labels")]
    assert report == [f"--import-labels {tmp_path / 'labels.csv'}: {len(rows)} rows, {len(labels)} labels added"]
    kinds = answers_by_kind(fresh)
    assert {sha1: CLASSES[a] for sha1, a in kinds["import"].items()} == labels
    asked = {**kinds.get("label", {}), **kinds.get("skip", {})}
    assert not set(asked) & set(labels) and len(asked) == 24 - len(labels)  # every other image, each once
    updates = [m for m in metrics(fresh) if not m.get("epoch_end")]
    assert updates and all(m["imported"] == len(labels) for m in updates)
    # learnt from at once, like any other label: the first update trains more labels than were asked
    assert updates[0]["human_images"] == 4 and updates[0]["asked_this_run"] < 4


def test_export_to_an_image_folder_reads_back_in_torchvision_while_a_session_holds_the_run(tmp_path, small_pool,
                                                                                           capsys):
    run = labelled_run(tmp_path, small_pool)
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    # a labeling session: the run's lock held, and an answer being written but not committed yet
    lock = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    writer = sqlite3.connect(run / "feedback.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO answers (sha1, path, answer, created) VALUES ('pending', '/x.jpg', 0, 0)")
    try:
        line = export(run, f"{tmp_path}/exported/ab/")
        export(run, tmp_path / "labels.jsonl", capsys)  # the same CLI, in this process
        export(run, tmp_path / "labels.csv", capsys)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        os.close(lock)
    rows = read_table(tmp_path / "labels.jsonl")
    assert rows == [{**r, "rejected": None, "policy_version": int(r["policy_version"])}
                    for r in read_table(tmp_path / "labels.csv")]
    assert "pending" not in {r["sha1"] for r in rows}
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "exported" / "ab"))
    assert folder.classes == sorted({r["class"] for r in rows}) == CLASSES
    assert sorted((file_sha1(path), folder.classes[c]) for path, c in folder.samples) == \
        sorted((r["sha1"], r["class"]) for r in rows)
    sources = {sha1: path for sha1, path, _, _ in store_rows(run)}
    assert all(os.path.samefile(path, sources[file_sha1(path)]) for path, _ in folder.samples)  # hard links
    assert f"{len(rows)} hard links, 0 copies" in line
    # the run is as it was, file by file; SQLite's own -wal/-shm beside the store may be new
    after = {name: (run / name).read_bytes() for name in os.listdir(run)}
    assert {k: v for k, v in after.items() if not k.endswith(("-wal", "-shm"))} == before

    fresh = tmp_path / "fresh"
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", fresh, "--import-labels",
                   tmp_path / "exported" / "ab", "--epochs", "1", "--max-answers", "3", *TINY)
    assert proc.returncode == 0, proc.stderr
    kinds = answers_by_kind(fresh)
    assert {sha1: CLASSES[a] for sha1, a in kinds["import"].items()} == {r["sha1"]: r["class"] for r in rows}
    assert len(kinds.get("label", {})) == 3 and not set(kinds["label"]) & set(kinds["import"])


def test_an_import_with_unknown_images_and_classes_reports_them_in_one_line(tmp_path, small_pool):
    files = list_image_files(small_pool)
    known = [(file_sha1(p), os.path.relpath(p, small_pool)) for p in files[:3]]
    with open(tmp_path / "mine.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "sha1", "class"])
        w.writerow([known[0][1], known[0][0], "ants"])
        w.writerow(["elsewhere/renamed.jpg", known[1][0], "bees"])  # matched by its hash
        w.writerow([known[2][1], "", "bees"])                        # no hash: matched by its path
        w.writerow(["gone.jpg", "f" * 40, "ants"])                   # an image not in the pool
        w.writerow(["", "", "ants"])                                 # nothing to match
        w.writerow([known[0][1], known[0][0], "wasps"])              # a class the run does not have
        w.writerow([known[1][1], known[1][0], "bees"])               # the same image again
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", out, "--import-labels", tmp_path / "mine.csv",
                   "--epochs", "1", "--max-answers", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    report, = [line for line in proc.stdout.splitlines() if line.startswith("--import-labels")]
    assert report.startswith(f"--import-labels {tmp_path / 'mine.csv'}: 7 rows, 3 labels added")
    assert f"2 for images not in {small_pool}" in report and "1 for classes the run does not have (wasps)" in report
    assert "1 repeating an image already read" in report
    assert answers_by_kind(out)["import"] == {known[0][0]: 0, known[1][0]: 1, known[2][0]: 1}

    # on --resume the same file adds nothing: those images are answered already
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--import-labels", tmp_path / "mine.csv")
    assert proc.returncode == 0, proc.stderr
    assert "0 labels added, 4 already answered in this run (kept)" in proc.stdout


def test_verdicts_export_as_yes_no_and_implied_rows_and_import_as_the_same_labels(tmp_path, small_pool):
    run = labelled_run(tmp_path, small_pool, "--ask", "verdict")
    export(run, tmp_path / "labels.csv")
    rows = read_table(tmp_path / "labels.csv")
    kinds = {r["kind"] for r in rows}
    assert kinds <= {"verdict-yes", "verdict-no", "implied"} and "verdict-no" in kinds
    nos = [r for r in rows if r["kind"] == "verdict-no"]
    assert all(not r["class"] and r["rejected"] in CLASSES for r in nos)
    # two classes: each no leaves one class, the label (as the run itself reads it), unless a later yes (the
    # image asked again while its posterior was unsure) gave the label
    implied = {r["sha1"]: r["class"] for r in rows if r["kind"] == "implied"}
    yes = {r["sha1"] for r in rows if r["kind"] == "verdict-yes"}
    assert implied == {r["sha1"]: CLASSES[1 - CLASSES.index(r["rejected"])] for r in nos if r["sha1"] not in yes}
    labels = {r["sha1"]: r["class"] for r in rows if r["class"]}

    fresh = tmp_path / "fresh"
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", fresh, "--import-labels",
                   tmp_path / "labels.csv", "--epochs", "1", "--max-answers", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(labels)} labels added, {len(nos)} verdict-no rows (not labels)" in proc.stdout
    assert {sha1: CLASSES[a] for sha1, a in answers_by_kind(fresh)["import"].items()} == labels


OLD_ANSWERS = """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE answers (id INTEGER PRIMARY KEY AUTOINCREMENT, sha1 TEXT NOT NULL UNIQUE, path TEXT NOT NULL,
    answer INTEGER, predicted INTEGER, probability REAL, sampled INTEGER, reward REAL, policy_version INTEGER,
    epoch INTEGER, created REAL NOT NULL);
INSERT INTO meta VALUES ('class_names', '["ants", "bees"]');
INSERT INTO answers (sha1, path, answer, predicted, policy_version, created)
    VALUES ('a1', '/pool/ants/a.jpg', 0, 1, 2, 5), ('s1', '/pool/bees/s.jpg', NULL, 1, 2, 6);
"""


def test_a_store_written_before_kinds_existed_exports_and_opens_unchanged(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    with sqlite3.connect(run / "feedback.sqlite") as db:
        db.executescript(OLD_ANSWERS)
    db.close()
    (run / "config.json").write_text(json.dumps({"images": "/pool"}))
    before = (run / "feedback.sqlite").read_bytes()
    rows = run_label_rows(str(run))  # read-only: no column added, nothing written
    assert [(r["path"], r["class"], r["kind"], r["policy_version"]) for r in rows] == [
        ("ants/a.jpg", "ants", "label", 2)]
    assert (run / "feedback.sqlite").read_bytes() == before
    store = FeedbackStore(str(run / "feedback.sqlite"))  # a run that resumes it: the column is added
    assert [(r["sha1"], r["answer"], r["kind"]) for r in store.rows()] == [("a1", 0, None), ("s1", None, None)]
    assert store.add("n1", "/pool/ants/n.jpg", 1, kind="label") and store.rows()[-1]["kind"] == "label"


def test_implied_labels_need_every_other_class_rejected():
    verdict = {"path": "/p/x.jpg", "policy_version": 0, "created": 1.0, "behaviour_prob": 0.5}
    verdicts = [{**verdict, "id": 1, "sha1": "x", "proposed": 0, "verdict": 0},
                {**verdict, "id": 2, "sha1": "x", "proposed": 1, "verdict": 0},
                {**verdict, "id": 3, "sha1": "y", "proposed": 2, "verdict": 0}]
    rows = store_label_rows([], verdicts, ["a", "b", "c"])
    assert [(r["sha1"], r["kind"], r["class"], r["rejected"]) for r in rows] == [
        ("x", "verdict-no", "", "a"), ("x", "verdict-no", "", "b"), ("y", "verdict-no", "", "c"),
        ("x", "implied", "c", "")]


def test_bad_label_files_and_export_targets_are_one_line_and_keep_what_was_saved(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 4, classes=["3", "8"])
    run = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", run, "--epochs", "1", "--max-answers", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    before = store_rows(run)
    (tmp_path / "broken.jsonl").write_text('{"sha1": "ab", "class": "3"}\n{"sha1": "cd", "class": \n')
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage\x9c" * 50)
    # as train_rlhf.py --resume --import-labels reads each (the missing file below, run as a user would)
    for source, needle in (("binary.csv", "not UTF-8 text"), ("broken.jsonl", "line 2: not JSON")):
        path = tmp_path / source
        with pytest.raises(LabelTransferError) as err:
            read_label_source(str(path))
        message = first_line(err.value)  # the one line the CLI reports
        assert all(n in message for n in (str(path), needle, "--export")), message
    path = tmp_path / "missing.csv"
    proc = run_cli("train_rlhf.py", "--out", run, "--resume", "--import-labels", path)
    assert_user_error(proc, str(path), "no such file", "--export")  # the fix names what to pass
    assert store_rows(run) == before
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", tmp_path / "new", "--import-labels",
                   tmp_path / "missing.csv", *TINY)
    assert_user_error(proc, "missing.csv", "no such file")
    assert not (tmp_path / "new").exists()  # a new run is not even begun

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(LabelTransferError) as err:  # as train_rlhf.py --out RUN --export reports it
        export_labels(str(run), str(blocker / "labels.csv"))
    message = first_line(err.value)  # the one line the CLI reports
    assert all(n in message for n in (str(blocker / "labels.csv"), "cannot write", "writable")), message
    assert_user_error(run_cli("train_rlhf.py", "--out", tmp_path / "nothing", "--export", tmp_path / "x.csv"),
                      "nothing", "holds no run", "--out")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "nothing").exists()
    assert store_rows(run) == before and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("content, needle", [
    ("3/digit_0000.png,3\n", "line 1: the header names no class"),
    ("path,sha1\nx.png,ab\n", "line 1: the header names no class"),
    ('{"sha1": "ab", "class": 3}\n', "line 1: not an object with text class"), ('["ab", "3"]\n', "line 1")])
def test_label_files_without_what_an_import_needs_are_refused(tmp_path, content, needle):
    path = tmp_path / ("labels.jsonl" if content.startswith(("{", "[")) else "labels.csv")
    path.write_text(content)
    with pytest.raises(LabelTransferError, match=re.escape(f"--import-labels {path}: {needle}")):
        read_label_source(str(path))


def test_label_sources_of_the_wrong_kind_are_refused(tmp_path):
    (tmp_path / "labels.txt").write_text("path,class\n")
    (tmp_path / "no_classes").mkdir()
    (tmp_path / "no_classes" / "notes.txt").write_text("x")
    for source, needle in (("labels.txt", "not a .csv, .jsonl or folder"), ("no_classes", "no images in class")):
        with pytest.raises(LabelTransferError, match=re.escape(needle)):
            read_label_source(str(tmp_path / source))


def test_export_targets_that_would_lose_or_mix_files_are_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    FeedbackStore(str(run / "feedback.sqlite")).check_classes(CLASSES)
    (run / "config.json").write_text(json.dumps({"images": str(tmp_path / "pool")}))  # beside the targets
    for target, needle in ((str(tmp_path / "labels.txt"), "write a .csv or .jsonl"),
                           (str(tmp_path / "full"), "already holds files"), (f"{blocker}/dir/", "cannot write")):
        with pytest.raises(LabelTransferError, match=re.escape(needle)):
            export_labels(str(run), target)
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
