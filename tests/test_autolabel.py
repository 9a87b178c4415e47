"""--autolabel: the Clopper-Pearson bound and the threshold against hand computations, and exports with auto rows
(CSV, JSON lines, ImageFolder; label and verdict runs) as a user runs them, the run left unchanged."""
import csv
import json
import os
import shutil

import pytest

from autolabel import (
    GRID,
    AutolabelError,
    answers_needed,
    binomial_cdf,
    bound_holds,
    choose_threshold,
    clopper_pearson_upper,
    more_needed,
    start_rows,
)
from conftest import assert_user_error, make_subset, run_cli
from label_transfer import export_labels, read_label_source

# head only on a frozen random backbone: updates take milliseconds; --rm-steps 8 lets the reward model learn
TINY = ["--feedback", "folder", "--image-size", "32", "--weights", "none", "--finetune", "head", "--batch-size",
        "8", "--rm-steps", "8", "--epochs", "2", "--max-answers", "48"]
LINE = "at most 30% of the auto rows wrong with 95% confidence"


def test_clopper_pearson_matches_hand_values():
    assert clopper_pearson_upper(0, 59) == pytest.approx(1 - 0.05 ** (1 / 59)) == pytest.approx(0.0495, abs=1e-4)
    u = clopper_pearson_upper(1, 93)  # where P(X <= 1) = (1-u)^93 + 93 u (1-u)^92 falls to 0.05
    assert (1 - u) ** 93 + 93 * u * (1 - u) ** 92 == pytest.approx(0.05, abs=1e-9)
    assert u == pytest.approx(0.04999, abs=1e-5)
    assert binomial_cdf(1, 6, 0.5) == pytest.approx(7 / 64)
    assert clopper_pearson_upper(0, 0) == 1.0 and clopper_pearson_upper(3, 3) == 1.0
    assert (answers_needed(0.05), answers_needed(0.02), answers_needed(0.01), answers_needed(0.0)) == (59, 149, 299,
                                                                                                       None)
    assert more_needed(0, 40, 0.05) == 19 and more_needed(1, 60, 0.05) == 33  # CP(1, 93) is the first <= 0.05


def test_sequence_starts_where_a_stray_error_still_passes():
    # 5% over 295 rows: 2 wrong of 124 pass (CP 0.0497), 3 wrong need 153 rows, more than half of 295
    assert bound_holds(2, 124, 0.05) and not bound_holds(2, 123, 0.05) and more_needed(3, 0, 0.05) == 153
    assert start_rows(295, 0.05) == 124 and start_rows(306, 0.05) == 153
    assert start_rows(40, 0.05) == 59  # never below the error-free fewest, even past the rows there are


def test_threshold_is_the_last_one_passed_before_the_first_failure():
    # MAX_ERROR 0.5 over 20 rows: 0 wrong of 5 pass, 1 of 8, 2 of 11 (more than half of 20): the start is 8
    conf = [0.99 - 0.01 * k for k in range(20)]
    assert start_rows(20, 0.5) == 8 and [more_needed(e, 0, 0.5) for e in range(3)] == [5, 8, 11]
    slip = [k != 1 for k in range(20)]  # the second most confident row is wrong
    cal = choose_threshold(conf, slip, 0.5)
    # a start at 5 rows would have stopped at once (1 wrong of 5: P(X <= 1 | p = 0.5) = 6/32 > 0.05)
    assert not bound_holds(1, 5, 0.5)
    assert (cal.threshold, cal.above, cal.errors, cal.calibrated, cal.first_tested) == (conf[19], 20, 1, 20, (8, 1))
    assert cal.bound == pytest.approx(clopper_pearson_upper(1, 20)) and cal.bound < 0.22
    two = [k not in (8, 9) for k in range(20)]  # rows 9 and 10 wrong: 1 of 9 passes, 2 of 10 do not
    cal = choose_threshold(conf, two, 0.5)
    assert bound_holds(1, 9, 0.5) and not bound_holds(2, 10, 0.5)
    assert (cal.threshold, cal.above, cal.errors) == (conf[8], 9, 1)
    # the sequence stops there, though 2 wrong of all 20 would pass
    assert bound_holds(2, 20, 0.5) and cal.best_bound == pytest.approx(clopper_pearson_upper(2, 20))
    assert choose_threshold(conf[:4], [True] * 4, 0.5).threshold is None  # 4 rows: no threshold can pass
    assert choose_threshold([0.9] * 9, [True] * 9, 0.5).above == 9  # a tie is one threshold


def test_grid_below_the_start_is_fixed_by_the_count():
    # 5% over 300 rows: the start (124 rows), then every 12 rows (300 / GRID), each at the last row of its step
    conf = [1 - 0.001 * k for k in range(300)]
    assert start_rows(300, 0.05) == 124 and GRID == 25
    cal = choose_threshold(conf, [True] * 300, 0.05)
    assert (cal.above, cal.first_tested) == (300, (124, 0))
    cal = choose_threshold(conf, [True] * 124 + [False] * 3 + [True] * 173, 0.05)
    assert not bound_holds(3, 136, 0.05) and (cal.above, cal.errors) == (124, 0)  # stops at the next grid point
    # rows 150-152 wrong: a test at every row would stop at 152 (3 of 152 fail); the grid tests 148, then 160
    cal = choose_threshold(conf, [True] * 149 + [False] * 3 + [True] * 148, 0.05)
    assert not bound_holds(3, 152, 0.05) and (cal.above, cal.errors) == (300, 3)


def test_autolabel_without_export_is_refused_in_one_line():
    proc = run_cli("train_rlhf.py", "--autolabel", "0.05")
    assert_user_error(proc, "--autolabel", "--export")


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, photos):
    """A headless label-mode run of 2 x 30 photos that answered 48 questions in 2 passes."""
    root = tmp_path_factory.mktemp("autolabel")
    pool = make_subset(root / "pool", photos, 30)
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", root / "run", *TINY)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def snapshot(run):
    """The run folder's files and their contents' times (SQLite's read-side companions aside)."""
    return {e.name: e.stat().st_mtime_ns for e in os.scandir(run) if not e.name.endswith(("-shm", "-wal"))}


def read_table(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f)) if str(path).endswith(".csv") else [json.loads(line) for line in f]


def test_csv_export_adds_auto_rows_for_unanswered_images_only(label_run, tmp_path):
    before = snapshot(label_run)
    proc = run_cli("train_rlhf.py", "--out", label_run, "--export", tmp_path / "labels.csv", "--autolabel", "0.3")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1 and LINE in line and "cross-fitted answers" in line, line
    rows = read_table(tmp_path / "labels.csv")
    auto = [r for r in rows if r["kind"] == "auto"]
    people = [r for r in rows if r["kind"] != "auto"]
    assert auto and rows == people + auto  # the person's rows first
    threshold = float(line.split("probability >= ")[1].split(")")[0])
    assert all(float(r["probability"]) >= threshold - 5e-4 and r["class"] for r in auto)
    assert all(r["probability"] == "" for r in people)
    assert not {r["sha1"] for r in auto} & {r["sha1"] for r in people} and len({r["sha1"] for r in auto}) == len(auto)
    assert f"{len(people)} labels" in line and f"{len(auto)} auto labels of {60 - len(people)} unanswered" in line
    assert snapshot(label_run) == before  # read, never written
    imported = read_label_source(str(tmp_path / "labels.csv"))  # an import reads auto rows as labels
    assert len(imported) == len(rows) and {r.kind for r in imported} == {"label", "auto"}


def test_jsonl_and_image_folder_exports_carry_the_auto_rows(label_run, tmp_path):
    line = export_labels(str(label_run), str(tmp_path / "labels.jsonl"), 0.3)
    rows = read_table(tmp_path / "labels.jsonl")
    auto = [r for r in rows if r["kind"] == "auto"]
    assert auto and all(isinstance(r["probability"], float) for r in auto) and LINE in line
    assert all(r["probability"] is None for r in rows if r["kind"] != "auto")
    line = export_labels(str(label_run), str(tmp_path / "folder") + "/", 0.3)
    files = [f for _, _, names in os.walk(tmp_path / "folder") for f in names]
    assert len(files) == len(rows) and f"and {len(auto)} auto-labelled" in line and LINE in line, line


def test_too_few_answers_give_no_auto_rows_and_say_how_many_more(label_run, tmp_path):
    line = export_labels(str(label_run), str(tmp_path / "labels.csv"), 0.01)
    # 299 error-free answers certify 1%: 48 leave 251 to give
    assert line.endswith("no auto labels: 48 answers allow no threshold at 1% (299 error-free answers are the "
                         "fewest that can certify it); about 251 more answers, none wrong above the threshold, "
                         "would allow some"), line
    assert all(r["kind"] != "auto" for r in read_table(tmp_path / "labels.csv"))


def test_a_run_without_a_checkpoint_is_refused(label_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(label_run, bare, ignore=shutil.ignore_patterns("checkpoint.pt"))
    with pytest.raises(AutolabelError, match="no checkpoint.pt yet"):
        export_labels(str(bare), str(tmp_path / "labels.csv"), 0.05)


def test_a_verdict_run_exports_auto_rows_never_on_a_rejected_class(tmp_path, photos):
    pool = make_subset(tmp_path / "pool", photos, 30)
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", tmp_path / "run", "--ask", "verdict", *TINY)
    assert proc.returncode == 0, proc.stderr
    line = export_labels(str(tmp_path / "run"), str(tmp_path / "labels.csv"), 0.3)
    assert LINE in line or "no auto labels: " in line, line
    rows = read_table(tmp_path / "labels.csv")
    labelled = {r["sha1"] for r in rows if r["class"] and r["kind"] != "auto"}
    rejected = {(r["sha1"], r["rejected"]) for r in rows if r["kind"] == "verdict-no"}
    auto = [r for r in rows if r["kind"] == "auto"]
    assert not any(r["sha1"] in labelled or (r["sha1"], r["class"]) in rejected for r in auto)
    assert not auto or f"{len(auto)} auto labels of" in line
