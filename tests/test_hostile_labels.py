"""Label files and exports against hostile names and the files of other tools: cells a spreadsheet would run
are neutralised and read back unchanged, other tools' spellings match, and an export that would feed the pool
or miscount what it wrote is refused or told."""
import csv
import hashlib
import json
import os
import sqlite3
from types import SimpleNamespace

import pytest

import inference
import train_rlhf
from conftest import assert_user_error, make_subset, run_cli
from csv_cells import FORMULA_STARTS, neutralise, restore
from dataset import file_sha1
from feedback_store import FeedbackStore
from label_transfer import LabelTransferError, export_labels, plan_import, read_label_source

TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4"]
# Class folders and file names that Excel and LibreOffice would run as formulas, and a quote that restoring
# must not eat.
HOSTILE_CLASSES = ['=HYPERLINK("e.x","y")', "-8"]
HOSTILE_NAMES = ["=cmd|' -C calc'!A0.png", "@a.png", "+b.png", "-c.png", "'d.png", "\te.png",
                 "f\rg.png", "h\ni.png"]  # a bare CR ended a CSV row early


def hostile_pool(dest, digits):
    """Two classes of hostile names, each image a link to a digit of its own class."""
    for cls, source in zip(HOSTILE_CLASSES, ("3", "8")):
        os.makedirs(dest / cls)
        images = sorted(os.listdir(os.path.join(digits, source)))
        for name, image in zip(HOSTILE_NAMES, images):
            os.symlink(os.path.join(digits, source, image), dest / cls / name)
    return str(dest)


def cells(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [cell for row in csv.reader(f) for cell in row]


def answers(run, kind):
    with sqlite3.connect(os.path.join(run, "feedback.sqlite")) as db:
        return dict(db.execute("SELECT sha1, answer FROM answers WHERE kind = ? AND answer IS NOT NULL", (kind,)))


@pytest.mark.parametrize("text", ['=HYPERLINK("x")', "=cmd|' -C calc'!A0", "+1", "-x.png", "@SUM(A1)", "\tx",
                                  "\rx", "'=x", "'plain", "''", "'", "-", "plain", "", "a=b"])
def test_a_neutralised_cell_starts_no_formula_and_restores_exactly(text):
    cell = neutralise(text)
    assert not cell.startswith(FORMULA_STARTS) and restore(cell) == text


def test_every_csv_the_tool_writes_is_safe_in_a_spreadsheet_and_an_export_round_trips(tmp_path, digits):
    pool = hostile_pool(tmp_path / "pool", digits)
    run = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", run, "--epochs", "1", "--max-answers", "8", *TINY)
    assert proc.returncode == 0, proc.stderr
    # the export and the classification as their CLIs run them, in this process
    assert train_rlhf.main(["--out", str(run), "--export", str(tmp_path / "labels.csv")]) == 0
    assert inference.main(["--model", str(run), "--csv", str(tmp_path / "classified.csv"), pool]) == 0
    for written in ("labels.csv", "classified.csv"):
        assert not [c for c in cells(tmp_path / written) if c.startswith(FORMULA_STARTS)], written
    with open(tmp_path / "classified.csv", encoding="utf-8", newline="") as f:
        classified = {restore(row["path"]) for row in csv.DictReader(f)}
    assert classified == {os.path.join(pool, cls, name) for cls in HOSTILE_CLASSES for name in HOSTILE_NAMES}

    # Matched by path alone, so the names themselves must come back as they were.
    with open(tmp_path / "labels.csv", encoding="utf-8", newline="") as f:
        exported = [(r["path"], r["class"]) for r in csv.DictReader(f) if r["class"]]
    with open(tmp_path / "by_path.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("path", "class"), *exported])  # the cells as exported, still neutralised
    fresh = tmp_path / "fresh"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", fresh, "--import-labels", tmp_path / "by_path.csv",
                   "--epochs", "1", "--max-answers", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(exported)} labels added" in proc.stdout, proc.stdout
    assert answers(fresh, "import") == answers(run, "label")


def test_a_label_file_that_is_a_pipe_is_refused_without_waiting(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 2, classes=["3", "8"])
    os.mkfifo(tmp_path / "labels.csv")  # no writer: opening it to read would wait forever, deaf to SIGTERM
    proc = run_cli("train_rlhf.py", "--images", pool, "--import-labels", tmp_path / "labels.csv",
                   "--out", tmp_path / "run", *TINY, timeout=120)
    assert_user_error(proc, f"--import-labels {tmp_path / 'labels.csv'}: not a regular file")
    assert not (tmp_path / "run").exists()


def fake_pool(root, names):
    """What plan_import reads of an ImagePool, for files that need not exist."""
    paths = [os.path.join(root, n) for n in names]
    hashes = [hashlib.sha1(n.encode()).hexdigest() for n in names]
    return SimpleNamespace(root=root, paths=paths, class_names=["ants", "bees"], all_hashes=lambda: hashes)


def test_label_files_of_other_tools_match_as_they_mean_and_ambiguous_ones_are_refused(tmp_path, digits):
    pool = fake_pool(str(tmp_path / "pool"), ["ants/a.png", "bees/b b.png", "ants/x\u2028y.png", "bees/c.png"])
    (tmp_path / "other.csv").write_text(f"class,sha1,path\nants,{pool.all_hashes()[0].upper()},\n"
                                        "bees,,bees\\b b.png\n", encoding="utf-8")
    (tmp_path / "other.jsonl").write_text(json.dumps({"class": "ants", "path": "ants/x\u2028y.png"},
                                                     ensure_ascii=False) + "\r\n", encoding="utf-8")
    rows = read_label_source(str(tmp_path / "other.csv")) + read_label_source(str(tmp_path / "other.jsonl"))
    report = plan_import("other", rows, pool, set())
    assert sorted(i for i, _ in report.added.values()) == [0, 1, 2] and not report.left_out

    for header in ("class,path,class", "sha1,class,sha1", "path,class,path,sha1"):
        (tmp_path / "twice.csv").write_text(f"{header}\n", encoding="utf-8")
        with pytest.raises(LabelTransferError, match="line 1: the header is ambiguous"):
            read_label_source(str(tmp_path / "twice.csv"))
    (tmp_path / "twice.jsonl").write_text('{"class": "ants", "path": "ants/a.png", "class": "bees"}\n')
    with pytest.raises(LabelTransferError, match="line 1: the object is ambiguous: it names class more than once"):
        read_label_source(str(tmp_path / "twice.jsonl"))
    for deep in ("[" * 100_000 + "]" * 100_000, '{"class": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        (tmp_path / "deep.jsonl").write_text('{"class": "ants", "path": "ants/a.png"}\n' + deep + "\n")
        with pytest.raises(LabelTransferError, match="line 2: nested too deeply"):
            read_label_source(str(tmp_path / "deep.jsonl"))
    images = make_subset(tmp_path / "images", digits, 2, classes=["3", "8"])
    proc = run_cli("train_rlhf.py", "--images", images, "--out", tmp_path / "new", "--import-labels",
                   tmp_path / "deep.jsonl", *TINY)
    assert_user_error(proc, "deep.jsonl", "nested too deeply")
    assert not (tmp_path / "new").exists()


def fake_run(tmp_path, labels):
    """A run folder of the pool tmp_path/pool whose store holds labels [(file, class index)]."""
    pool, run = tmp_path / "pool", tmp_path / "run"
    run.mkdir()
    store = FeedbackStore(str(run / "feedback.sqlite"))
    store.check_classes(["ants", "bees"])
    for name, answer in labels:
        path = pool / ["ants", "bees"][answer] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())  # distinct contents: distinct hashes
        store.add(file_sha1(str(path)), str(path), answer, kind="label")
    store.close()
    (run / "config.json").write_text(json.dumps({"images": str(pool)}))
    return pool, run


def test_an_image_folder_export_inside_the_image_folder_is_refused_and_touches_nothing(tmp_path):
    pool, run = fake_run(tmp_path, [("a.png", 0), ("b.png", 1)])
    os.symlink(pool / "ants", tmp_path / "into_pool")
    before = sorted(os.walk(pool))
    assert_user_error(run_cli("train_rlhf.py", "--out", run, "--export", f"{pool}/exported/"),
                      f"{pool}/exported/", "inside the run's image folder", "outside it")
    for target in (f"{pool}/ants/", f"{pool}/", f"{tmp_path}/into_pool/new/", f"{pool}/ants/../../pool/new/"):
        with pytest.raises(LabelTransferError, match="inside the run's image folder"):
            export_labels(str(run), target)
    assert sorted(os.walk(pool)) == before
    line = export_labels(str(run), f"{pool}-export/")  # a sibling whose name starts with the pool's
    assert line.startswith("exported 2 labelled images") and sorted(os.listdir(f"{pool}-export")) == ["ants", "bees"]


def test_the_image_folder_export_line_counts_what_it_wrote_and_names_what_was_missing(tmp_path):
    pool, run = fake_run(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("d.png", 1)])
    os.unlink(pool / "ants" / "a.png")
    os.unlink(pool / "bees" / "c.png")
    os.unlink(pool / "bees" / "d.png")
    line = export_labels(str(run), str(tmp_path / "out") + "/")
    assert line.startswith("exported 1 labelled images") and "(ants 1;" in line, line
    assert "3 labelled images no longer at their stored path, left out" in line, line
    assert os.listdir(tmp_path / "out") == ["ants"]
