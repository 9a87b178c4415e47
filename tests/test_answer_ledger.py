"""The answer ledger: the implied-label rule, latest-wins, undo, and one reading of a store shared by the loop,
the window's class tally and the export."""
from collections import Counter

import torch

from answer_ledger import SKIP, AnswerLedger
from conftest import make_subset
from dataset import ImagePool
from feedback_store import FeedbackStore
from label_transfer import store_label_rows
from learner import Learner
from rlhf_run import RLHFRun
from run_config import RunConfig

ROW = {"path": "/p/x.jpg", "policy_version": 0, "created": 1.0}


def verdict(id, sha1, proposed, yes):
    return {**ROW, "id": id, "sha1": sha1, "proposed": proposed, "behaviour_prob": 0.5, "verdict": yes}


def test_the_last_class_left_after_every_other_was_rejected_is_the_label_until_a_no_is_undone():
    ledger = AnswerLedger(3)
    a = ledger.add_verdict("x", 0, 0.5, 0, 0)
    assert "x" not in ledger.label_of and ledger.allowed("x") == [1, 2]
    b = ledger.add_verdict("x", 1, 0.5, 0, 0)
    assert ledger.label_of["x"] == 2 and ledger.is_implied("x") and ledger.no_keys("x") == [a.key, b.key]
    assert ledger.given() == 2 and ledger.counts() == [0, 0, 1]  # the label adds nothing to the budget
    ledger.undo_verdict(b.key)
    assert "x" not in ledger.label_of and ledger.allowed("x") == [1, 2] and ledger.given() == 1


def test_the_latest_label_wins_and_undo_falls_back_to_what_is_left():
    ledger = AnswerLedger(3)
    ledger.add_answer("x", 0)
    yes = ledger.add_verdict("x", 2, 0.5, 1, 0)
    assert ledger.label_of["x"] == 2 and ledger.yes_key("x") == yes.key
    ledger.undo_verdict(yes.key)
    assert ledger.label_of["x"] == 0 and ledger.kind_of["x"] == "label" and ledger.yes_key("x") is None
    ledger.add_answer("x", SKIP)
    assert ledger.label_of["x"] is SKIP and ledger.labelled() == [] and ledger.given() == 1
    ledger.undo_answer("x")
    assert "x" not in ledger.label_of and ledger.given() == 0


def test_the_tally_counts_the_persons_labels_yes_and_a_class_left_by_nos_but_not_imports():
    answers = [{**ROW, "sha1": "imp", "answer": 0, "kind": "import"},
               {**ROW, "sha1": "l", "answer": 1, "kind": "label"},
               {**ROW, "sha1": "old", "answer": 1, "kind": None},
               {**ROW, "sha1": "s", "answer": None, "kind": "skip"}]
    verdicts = [verdict(1, "y", 2, 1), verdict(2, "x", 0, 0), verdict(3, "x", 1, 0)]
    ledger = AnswerLedger.from_store(answers, verdicts, 3)
    assert ledger.counts() == [0, 2, 2] and ledger.counts(imported=True) == [1, 2, 2]
    ledger.add_verdict("z", 0, 0.5, 0, 0)
    assert ledger.counts() == [0, 2, 2]  # one no of two: no label yet
    last = ledger.add_verdict("z", 1, 0.5, 0, 0)
    assert ledger.counts() == [0, 2, 3]
    ledger.undo_verdict(last.key)        # undone: the label it made goes too
    assert ledger.counts() == [0, 2, 2]


def test_loop_window_tally_and_export_read_the_same_labels_and_counts(tmp_path, digits):
    import feedback_gui
    ds = ImagePool(make_subset(tmp_path / "pool", digits, 4, classes=["1", "4", "7"]), image_size=32)
    h = [ds.hash_of(i) for i in range(len(ds))]
    store = FeedbackStore(str(tmp_path / "feedback.sqlite"))
    store.check_classes(ds.class_names)
    store.add(h[0], ds.paths[0], 0, predicted=1, kind="label")
    store.add(h[1], ds.paths[1], None, kind="skip")
    store.add_imported([(h[2], ds.paths[2], 2)])
    for proposed in (0, 1):                                    # two no's: image 3 is implied class 2
        store.add_verdict(h[3], ds.paths[3], proposed, 0.5, 0, "sample")
    store.add_verdict(h[4], ds.paths[4], 1, 0.5, 1, "sample")  # a yes
    store.add_verdict(h[5], ds.paths[5], 2, 0.5, 0, "sample")  # a no that settles nothing
    store.add(h[6], ds.paths[6], 1, kind="label")              # answered, then undone in the window
    window = feedback_gui.SessionTally(store, ds.class_names, True, ds.hash_of).ledger
    store.remove(h[6])
    window.undo_answer(h[6])

    cfg = RunConfig(images=ds.root, seed=0, out=str(tmp_path), ask="verdict")
    run = RLHFRun(cfg, ds, Learner(3, None, "head", seed=0), store, str(tmp_path), "random")
    rows = store_label_rows(store.rows(), store.verdicts(), ds.class_names)
    exported = {r["sha1"]: ds.class_names.index(r["class"]) for r in rows if r["class"]}
    loop = {h[i]: c for i, c in run.answer_of.items() if c is not SKIP}
    tallied = {sha1: c for sha1, c in window.label_of.items() if c is not SKIP}
    assert loop == tallied == exported == {h[0]: 0, h[2]: 2, h[3]: 2, h[4]: 1}
    counted = Counter(ds.class_names.index(r["class"]) for r in rows if r["class"] and r["kind"] != "imported")
    assert run.ledger.counts() == window.counts() == [counted[c] for c in range(3)] == [1, 1, 1]
    assert {r["kind"] for r in rows} == {"label", "imported", "implied", "verdict-yes", "verdict-no"}
    assert run.ledger.given() == window.given() == 6  # a label, a skip and four verdicts; not the import
    assert run.ledger.rejected(3) == window.rejected(h[3]) == {0, 1} and torch.is_tensor(run.labels([0]))
