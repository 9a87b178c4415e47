"""--recheck: the person's answers the models disagree with most are asked again; the latest answer wins, both
stay in the store, undo and resume keep the ledger and the store in step."""
import os
import sqlite3
import threading
import types

import torch

from answer_ledger import CONFIRMED, RECHECK, SKIP, AnswerLedger
from answer_rechecks import Rechecks
from conftest import copied_subset, make_subset, metrics, run_cli
from feedback_store import FeedbackStore

TINY = ["--feedback", "folder", "--image-size", "32", "--weights", "none", "--batch-size", "8", "--epochs", "1",
        "--order", "random"]


def recheck_rows(run_dir):
    with sqlite3.connect(os.path.join(run_dir, "feedback.sqlite")) as db:
        return db.execute("SELECT sha1, path, earlier, answer FROM rechecks ORDER BY id").fetchall()


def answer_rows(run_dir):
    with sqlite3.connect(os.path.join(run_dir, "feedback.sqlite")) as db:
        return {sha1: (path, answer) for sha1, path, answer in db.execute("SELECT sha1, path, answer FROM answers")}


def test_the_latest_answer_wins_undo_restores_the_earlier_and_every_recheck_counts_as_a_question():
    ledger = AnswerLedger(3)
    ledger.add_answer("a", 0)
    ledger.add_answer("b", 1)
    assert ledger.given() == 2
    assert ledger.add_recheck("a", 2, row=7) == RECHECK
    assert ledger.label_of["a"] == 2 and ledger.kind_of["a"] == RECHECK and ledger.given() == 3
    assert ledger.add_recheck("b", 1) == CONFIRMED and ledger.add_recheck("b", SKIP) == CONFIRMED
    assert ledger.label_of["b"] == 1 and ledger.kind_of["b"] == "label" and ledger.given() == 5
    assert ledger.undo_recheck("a") == 7
    assert ledger.label_of["a"] == 0 and ledger.kind_of["a"] == "label" and "a" not in ledger.rechecks
    assert ledger.counts() == [1, 1, 0] and ledger.given() == 4


def test_a_store_keeps_both_answers_and_the_ledger_it_reads_has_the_latest(tmp_path):
    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    store.check_classes(["x", "y", "z"])
    store.add("h1", "p1", 0)
    store.add("h2", "p2", 1)
    row = store.add_recheck("h1", "p1", 0, 2)
    store.add_recheck("h2", "p2", 1, 1)
    assert store.answers() == {"h1": 0, "h2": 1}  # the earlier answers stay as they were
    ledger = AnswerLedger.from_store(store.rows(), store.verdicts(), 3, store.rechecks())
    assert ledger.label_of == {"h1": 2, "h2": 1} and ledger.kind_of == {"h1": RECHECK, "h2": "label"}
    assert store.remove_recheck(row)
    ledger = AnswerLedger.from_store(store.rows(), store.verdicts(), 3, store.rechecks())
    assert ledger.label_of["h1"] == 0 and "h2" in ledger.rechecks
    store.close()


def fake_run(labels):
    ledger = AnswerLedger(2)
    for image, label in labels.items():
        ledger.add_answer(image, label)
    return types.SimpleNamespace(ledger=ledger, answer_of=ledger.label_of, lock=threading.RLock(),
                                 questions=types.SimpleNamespace(outstanding=set())), ledger


def test_the_answers_the_models_doubt_most_are_queued_first_within_the_share_of_questions():
    run, ledger = fake_run({i: i % 2 for i in range(20)})
    rechecks = Rechecks(0.1, seed=0)  # 20 questions: room for 2
    probs = torch.tensor([[0.9, 0.1]] * 20)  # the model's likeliest is class 0 everywhere
    probs[3] = torch.tensor([0.99, 0.01])   # answered 1: the most doubted
    probs[5] = torch.tensor([0.6, 0.4])     # answered 1: doubted least of the odd ones
    rechecks.note_fresh(list(range(20)), [True] * 20, torch.tensor([i % 2 for i in range(20)]),
                        types.SimpleNamespace(new_answer_probs=probs))
    rechecks.plan(run)
    assert rechecks.due[0] == 3 and len(rechecks.due) == 2 and 5 not in rechecks.due
    assert all(i % 2 == 1 for i in rechecks.due)  # an answer the model agrees with is never doubted
    first = rechecks.hand_out(run)
    assert first == 3 and rechecks.answered(3) and not rechecks.answered(3)
    ledger.add_recheck(3, 1)  # confirmed: never asked again
    rechecks.plan(run)
    assert 3 not in rechecks.due and len(rechecks.due) == 1


def test_cross_fits_come_at_each_doubling_until_one_has_scored_128_answers_in_the_window_at_every_one():
    for estimate, expected in ((False, [32, 64, 128]), (True, [32, 64, 128, 256, 512])):
        run, ledger = fake_run({i: i % 2 for i in range(600)})
        rechecks, fitted = Rechecks(0.02, seed=0, estimate=estimate), []

        def crossfit(run, answered, rechecks=rechecks, fitted=fitted):
            fitted.append(len(answered))
            rechecks.crossfit_at = len(answered)

        rechecks.crossfit = crossfit
        for n in range(8, 600, 8):
            run.answer_of = {i: i % 2 for i in range(n)}
            ledger.kind_of = dict.fromkeys(range(n), "label")
            rechecks.plan(run)
        assert fitted == expected, estimate


def test_a_headless_run_rechecks_slips_within_its_share_and_counts_them_as_questions(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 8)
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, *TINY, "--max-answers", "60",
                   "--feedback-noise", "0.3", "--noise-kind", "slip", "--recheck", "0.25", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    answers, rechecks = answer_rows(out), recheck_rows(out)
    assert len(answers) + len(rechecks) == 60  # rechecks are questions: --max-answers counts them
    assert 0 < len(rechecks) <= 15
    assert len({sha1 for sha1, *_ in rechecks}) == len(rechecks)  # no answer is asked again twice
    for sha1, path, earlier, answer in rechecks:
        assert answers[sha1] == (path, earlier)  # the earlier answer stays in the store as it was
    last = metrics(out)[-1]
    changed = sum(earlier != answer and answer is not None for _, _, earlier, answer in rechecks)
    assert last["rechecks"] == len(rechecks) and last["recheck_changed"] == changed
    # a slip asked again is answered afresh: some rechecks change the answer, to the folder's class
    truth = {sha1: os.path.basename(os.path.dirname(path)) for sha1, (path, _) in answers.items()}
    fixed = [answer for sha1, _, earlier, answer in rechecks if answer != earlier and answer is not None
             and str(answer) == truth[sha1]]
    assert fixed, rechecks
    from label_transfer import run_label_rows
    exported = {r["sha1"]: r for r in run_label_rows(str(out))}
    for sha1, _, earlier, answer in rechecks:
        changed = answer is not None and answer != earlier
        assert exported[sha1]["kind"] == ("recheck" if changed else "label")
        assert exported[sha1]["class"] == str(answer if changed else earlier)  # digit folders: class names

    again = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2", "--max-answers", "66")
    assert again.returncode == 0, again.stderr
    later = recheck_rows(out)
    assert later[:len(rechecks)] == rechecks  # resumed: nothing rechecked is asked again
    assert len({sha1 for sha1, *_ in later}) == len(later)
    assert len(answer_rows(out)) + len(later) == 66


def test_recheck_zero_asks_nothing_again(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 6)
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, *TINY, "--max-answers", "48",
                   "--feedback-noise", "0.3", "--noise-kind", "slip", "--recheck", "0")
    assert proc.returncode == 0, proc.stderr
    assert recheck_rows(out) == [] and len(answer_rows(out)) == 48
    assert "rechecks" not in metrics(out)[-1]


def test_a_window_session_estimates_after_each_cross_fit_how_many_unanswered_images_auto_labels_could_cover(
        tmp_path, digits):
    from dataset import ImagePool
    from ddp import Ranks
    from feedback_gui import autolabel_text
    from rlhf_run import open_run, run_headless
    from run_config import RunConfig
    from simulated_labeler import FolderLabeler
    pool = copied_subset(tmp_path / "pool", digits, 16, classes=["0", "1", "7"])
    ds = ImagePool(pool, 32)
    os.makedirs(tmp_path / "run")
    # feedback gui: what the window's session computes, driven here by the simulated person
    cfg = RunConfig(images=pool, feedback="gui", epochs=1, image_size=32, weights="none", batch_size=8,
                    max_answers=40, order="random", recheck=0.0, out=str(tmp_path / "run"))
    run = open_run(cfg, cfg.out, ds, None, None, "random", "cpu", Ranks())
    run_headless(run, FolderLabeler(ds))
    run.store.close()
    lines = [m for m in metrics(cfg.out) if "autolabel_unanswered" in m]
    assert lines and all(m["update"] * 8 >= 32 for m in lines)  # from the first cross-fit on (32 answers) on
    last = lines[-1]
    assert last["autolabel_unanswered"] == len(ds) - len(run.ledger.labelled())
    text = autolabel_text(last)
    if "autolabel_covered" in last:
        assert 0 <= last["autolabel_covered"] <= last["autolabel_unanswered"] and "could label" in text
    else:
        assert last["autolabel_more_answers"] > 0 and "more answers" in text
    assert autolabel_text({"autolabel_unanswered": 9000, "autolabel_max_error": 0.02, "autolabel_covered": 6210,
                           "autolabel_threshold": 0.93}) == (
        "\nthe model could label 6,210 of the 9,000 unanswered at ≤ 2% error (--export FILE --autolabel 0.02)")
