"""The loop's owner, RLHFRun: answers, verdicts, undo and updates as every driver (headless, window, bench)
sees them."""
import os
import sqlite3

import pytest
import torch

from conftest import make_subset
from dataset import ImagePool
from feedback_store import FeedbackStore
from learner import Learner, UpdateBatch, VerdictBatch
from question_queue import DEFAULT_SCORE_POOL
from rlhf_run import RLHFRun, checkpoint_of, give_answer, give_verdict
from run_config import RewardModelConfig, RunConfig

GUESS = torch.tensor([0.7, 0.3])  # the guess shown with every answer: class 0


def make_run(tmp_path, digits, classes=("3", "8"), **cfg):
    ds = ImagePool(make_subset(tmp_path / "pool", digits, 12, classes=list(classes)), image_size=32)
    config = RunConfig(images=ds.root, seed=3, out=str(tmp_path), checkpoint_every=0, **cfg)
    learner = Learner(len(classes), None, "all", config.ppo, config.rm, seed=0)
    return RLHFRun(config, ds, learner, FeedbackStore(str(tmp_path / "f.sqlite")), str(tmp_path), "random")


def answer(run, n):
    asked = run.next_questions(n)
    for index in asked:
        give_answer(run, index, run.ds.labels[index], GUESS)
    return asked


def test_a_label_run_updates_after_24_answers_a_verdict_run_after_8_unless_told(tmp_path, digits):
    run = make_run(tmp_path, digits, order="random")
    answer(run, 23)
    assert not run.update_due()  # a label names the class: fewer updates per answer
    answer(run, 1)
    assert run.update_due()
    assert RunConfig(ask="verdict").answers_per_update() == 8  # the next proposals need the policy moved
    assert RunConfig(ask="verdict", batch_size=5).answers_per_update() == 5
    assert RunConfig().to_flat()["batch_size"] is None  # a new run's config.json keeps the rule, not a number
    # a run made before keeps the batch its config.json holds
    assert RunConfig.from_flat({**RunConfig().to_flat(), "batch_size": 8}).answers_per_update() == 8


@pytest.mark.parametrize("told, sizes", [(None, [22]), (5, [5, 5, 5, 5, 2])])
def test_the_epochs_end_trains_its_unanswered_images_24_per_update_unless_told(tmp_path, digits, told, sizes):
    run = make_run(tmp_path, digits, batch_size=2, order="random",
                   **({"unanswered_batch": told} if told else {}))
    answer(run, 2)
    run.update()
    taken, take = [], run.training.take

    def spy(batch_size, rm_only, unanswered):
        out = take(batch_size, rm_only, unanswered)
        if rm_only:
            taken.append(len(out[2]))
        return out
    run.training.take = spy
    assert run.finish_epoch()
    assert taken == sizes  # no answer waits, so fewer, bigger updates; each unanswered image trained once


def test_replay_draws_only_answers_the_reward_model_was_fitted_on(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="random")
    replays = []
    update = run.learner.update

    def counting_update(batch):
        replays.append(len(batch.answers_replay))
        return update(batch)

    run.learner.update = counting_update
    answer(run, 10)        # 10 answers queued: the first update takes 4, six wait
    run.update()
    assert replays == [0]  # nothing fitted before: the six waiting answers are not replayed
    run.update()
    assert replays[-1] == 4 and run.training.rm_fitted == set(run.training.pending) ^ set(run.answer_of)


def test_store_and_metrics_speak_of_the_guess_the_person_was_shown(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="sequential")
    asked = answer(run, 4)
    metrics = run.update()
    rows = run.store.rows()
    assert [r["predicted"] for r in rows] == [0] * 4 and all(r["probability"] == GUESS[0].item() for r in rows)
    assert [r["reward"] for r in rows] == [1.0 if run.ds.labels[i] == 0 else -1.0 for i in asked]
    assert metrics["mean_reward"] == sum(r["reward"] for r in rows) / 4


def test_undo_of_a_trained_answer_refits_the_reward_model_and_asks_it_again(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="sequential")
    asked = answer(run, 4)
    run.update()
    before = {k: v.clone() for k, v in run.learner.reward_model.state_dict().items()}
    assert run.undo(asked[-1]) is True                     # the reward model had learnt it
    run.store.remove(run.ds.hash_of(asked[-1]))            # the window takes it out of the store
    assert asked[-1] not in run.answer_of and len(run.store.rows()) == 3
    run.refit_reward_model()
    after = run.learner.reward_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not run.questions_done()                        # handed out again: the window asks it once more
    asked_again = answer(run, 1)
    assert asked_again != [asked[-1]]                      # the next question is a new image ...
    give_answer(run, asked[-1], 1, GUESS)                  # ... and the undone one is answered again
    assert run.answer_of[asked[-1]] == 1 and asked[-1] in run.training.pending


def test_disagreement_counts_only_once_the_reward_model_has_earned_trust(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.0)
    pool = list(range(len(run.ds)))
    run.learner.predicted_rewards = lambda x: torch.tensor([[1.0, -1.0]] * x.shape[0])  # it always says 0
    run.learner.policy_probs = lambda x: torch.tensor([[0.3, 0.7]] * (x.shape[0] // 2)
                                                      + [[0.6, 0.4]] * (x.shape[0] - x.shape[0] // 2))
    untrusted = run.rank_questions(pool, None)
    run.learner.rm_record = [(1, a) for a in [0, 1] * 32]
    trusted = run.rank_questions(pool, None)
    half = len(pool) // 2
    assert untrusted[:half] == pool[half:]   # smallest margin first (0.2 < 0.4): the untrusted reward model is ignored
    assert trusted[:half] == pool[:half]     # the policy says 1, a trusted reward model 0: least sure first


def test_the_reward_model_measures_itself_on_answers_before_it_is_fitted_on_them(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="sequential", rm=RewardModelConfig(rm_min_answers=4))
    answer(run, 4)
    first = run.update()
    assert "rm_acc" in first and len(run.learner.rm_record) == 4
    run.finish_epoch()                       # a second epoch revisits the same answers: nothing fresh
    assert len(run.learner.rm_record) == 4


def test_hard_verdicts_never_propose_a_rejected_class_again_and_the_last_one_left_is_a_label(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", propose_explore=0.5, order="sequential",
                   rm=RewardModelConfig(verdict_evidence="hard"))
    index = run.next_question()
    flat = torch.tensor([1 / 3] * 3)
    proposed, behaviour = run.propose(index, flat)
    assert behaviour == pytest.approx(1 / 3)
    give_verdict(run, index, proposed, behaviour, 0)
    assert index in run.questions.unasked and index not in run.answer_of  # asked again later, with another class
    for _ in range(50):
        again, p = run.propose(index, flat)
        assert again != proposed and p == pytest.approx(1 / 2)
    give_verdict(run, index, again, 0.5, 0)
    (left,) = set(range(3)) - {proposed, again}
    assert run.answer_of[index] == left and index not in run.questions.unasked  # two no's among three: a label
    assert [r["verdict"] for r in run.store.verdicts()] == [0, 0] and run.ledger.given() == 2


def test_verdicts_count_against_the_budget_and_a_yes_is_a_label(tmp_path, digits):
    run = make_run(tmp_path, digits, ask="verdict", max_answers=3, order="sequential")
    first, second = run.next_questions(2)
    give_verdict(run, first, 0, 0.6, 0)     # no: image 'first' may come back
    give_verdict(run, second, 1, 0.7, 1)    # yes: a label
    assert run.answer_of[second] == 1 and first in run.answer_of  # 2 classes: one no leaves the other
    assert run.next_questions(5) == [run.questions.order[2]]  # the third verdict is the last the budget allows
    assert run.update_due() is False and len(run.training.pending) == 2


def test_undoing_a_verdict_hands_the_question_out_again_and_takes_it_out_of_the_store(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential")
    index = run.next_question()
    key = give_verdict(run, index, 2, 0.4, 0)
    row = run.ledger.verdicts[key].row
    assert run.training.pending_no == [key]
    assert run.undo_verdict(row) is False  # not fitted yet: nothing to refit
    run.store.remove_verdict(row)          # the window takes it out of the store
    assert run.store.verdicts() == [] and run.training.pending_no == [] and 2 in run.ledger.allowed(index)
    assert index in run.questions.outstanding and not run.questions_done()


def test_an_update_learns_from_a_no_on_its_logged_class(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", batch_size=2, order="sequential")
    a, b = run.next_questions(2)
    give_verdict(run, a, 0, 0.5, 0)
    give_verdict(run, b, run.ds.labels[b], 0.5, 1)
    metrics = run.update()
    assert metrics["verdict_no_images"] == 1 and metrics["verdicts"] == 2 and metrics["yes_share"] == 0.5
    assert "rm_verdict_acc" in metrics and run.training.no_fitted == {0} and run.training.rm_fitted == {b}
    # on the head alone (no BatchNorm statistics moving), each "no" lowers the rejected class
    learner = Learner(3, None, "head", seed=0)
    x = torch.randn(1, 512)
    before = learner.policy_probs(x)[0, 0].item()
    for _ in range(3):
        no = VerdictBatch(x, torch.tensor([0]), torch.tensor([0.4]), x[:0], torch.tensor([], dtype=torch.long))
        learner.update(UpdateBatch(x[:0], torch.tensor([], dtype=torch.long), no=no))
    assert learner.policy_probs(x)[0, 0].item() < before


def test_a_store_of_the_first_format_opens_and_resumes_unchanged(tmp_path):
    path = tmp_path / "f.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO answers (sha1, path, answer, predicted, probability, sampled, reward, policy_version,"
               " epoch, created) VALUES ('abc', 'x.png', 1, 0, 0.6, 1, 1.0, 0, 0, 1.0)")
    db.commit()
    db.close()
    store = FeedbackStore(str(path))
    assert store.answers() == {"abc": 1} and store.verdicts() == [] and store.counts() == (1, 0)
    store.add_verdict("def", "y.png", 0, 0.5, 1, "sample")
    assert [v["sha1"] for v in store.verdicts()] == ["def"]


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE answers (id INTEGER PRIMARY KEY AUTOINCREMENT, sha1 TEXT NOT NULL UNIQUE, path TEXT NOT NULL,
    answer INTEGER, predicted INTEGER, probability REAL, sampled INTEGER, reward REAL, policy_version INTEGER,
    epoch INTEGER, created REAL NOT NULL);
INSERT INTO meta VALUES ('class_names', '["ants", "bees"]');
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_resume_from_an_older_checkpoint_counts_later_answers_as_not_yet_learnt(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="sequential")
    answer(run, 4)
    run.update()
    ckpt = checkpoint_of(run)          # the checkpoint knows the four answers it has learnt
    later = answer(run, 4)                # four more, in the store only (then the process is killed)
    again = RLHFRun(run.cfg, run.ds, Learner(2, None, "all", seed=0), run.store, str(tmp_path), "random")
    again.restore(ckpt)
    fitted = again.training.rm_fitted
    assert len(again.answer_of) == 8 and not fitted & set(later) and len(fitted) == 4


def test_an_image_that_stops_decoding_after_the_scan_is_never_asked(tmp_path, digits):
    run = make_run(tmp_path, digits, order="sequential")
    broken = run.ds.paths[0]
    os.unlink(broken)  # a symlink of the subset: now a file that no longer decodes
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.warns(UserWarning, match="cannot be decoded any more"):
        asked = run.next_questions(len(run.ds))
    assert 0 not in asked and sorted(asked) == list(range(1, len(run.ds)))


def test_with_frozen_features_a_ranking_computes_features_for_a_bounded_sample_only(tmp_path, digits):
    ds = ImagePool(make_subset(tmp_path / "pool", digits, 20), image_size=32)  # 200 images, 10 classes
    # the uncertainty ranking alone: --cover-first's head reads thumbnails, not features
    config = RunConfig(images=ds.root, seed=3, out=str(tmp_path), checkpoint_every=0, batch_size=4, finetune="head",
                       cover_first=0)
    learner = Learner(ds.num_classes, None, "head", config.ppo, config.rm, seed=0)
    run = RLHFRun(config, ds, learner, FeedbackStore(str(tmp_path / "f.sqlite")), str(tmp_path), "random")
    answer(run, 4)
    run.update()  # ranks the unasked after it: the 4 answers' features and a sample of 64 others
    assert len(run.cache.features) == 4 + DEFAULT_SCORE_POOL < len(ds)  # not the whole pool's features
    run.refresh_ranking()  # every unasked image with cached features, and 64 more
    assert len(run.cache.features) == 4 + 2 * DEFAULT_SCORE_POOL
    assert sorted(run.questions.ranking) == sorted(i for i in run.questions.unasked if run.cache.has(ds, i))


def test_answers_whose_hashes_arrive_late_are_linked_and_never_asked_again(tmp_path, digits, monkeypatch):
    # A session answered 4 pictures, with 2 verdicts "no", and was killed before the hash cache kept their
    # files: the next start reads their hashes in the background, after the pool is returned.
    from test_dataset import gate_background_reading
    first = make_run(tmp_path, digits, classes=("3", "5", "8"), batch_size=4, order="sequential")
    root = first.ds.root
    first.ds = ImagePool(root, image_size=32, cache_dir=str(tmp_path))  # the same pool, hashes cached
    asked = answer(first, 4)
    said_no = first.next_questions(2)
    for i in said_no:
        give_verdict(first, i, (first.ds.labels[i] + 1) % 3, 0.5, 0)
    first.ds.close()
    db = sqlite3.connect(tmp_path / "hashes.sqlite")
    with db:
        db.executemany("DELETE FROM files WHERE path=?", [(first.ds.paths[i],) for i in asked + said_no])
    db.close()
    opened, _ = gate_background_reading(monkeypatch)
    ds = ImagePool(root, image_size=32, cache_dir=str(tmp_path), hash_in_background=True)
    run = RLHFRun(first.cfg, ds, Learner(3, None, "all", seed=0), first.store, str(tmp_path), "random")
    assert not set(run.answer_of) & set(asked) and not run.ledger.verdicts and ds.hasher is None  # not known yet
    rest = [run.next_question()]  # reads the hash of each image it considers before handing it out
    assert ds.hasher is not None  # the first question starts the reading of the rest
    opened.set()
    ds.hasher.join(60)
    rest += run.next_questions(len(ds))
    assert not set(rest) & set(asked) and sorted(rest + asked) == list(range(len(ds)))
    assert {i: run.answer_of[i] for i in asked} == {i: ds.labels[i] for i in asked}
    rejected = {v.image: run.ledger.rejected(v.image) for v in run.ledger.live_verdicts()}
    assert rejected == {i: {(ds.labels[i] + 1) % 3} for i in said_no} and set(said_no) <= set(rest)  # asked on
    assert run.training.rm_fitted == set(asked) and len(run.training.no_fitted) == 2


def test_guesses_and_scores_of_new_answers_reuse_the_ranking_until_a_model_changes(tmp_path, digits):
    run = make_run(tmp_path, digits, batch_size=4, order="uncertain", recheck=0.0)
    run.learner.rm_record = [(1, a) for a in [0, 1] * 32]  # trusted: the ranking asks the reward model too
    answer(run, 4)
    run.update()                                           # ends with a ranking of the unasked by both models
    learner, shapes = run.learner, []
    policy_probs = learner.policy_probs

    def counted(x):
        shapes.append(x.shape[0])
        return policy_probs(x)

    learner.policy_probs = counted
    asked = run.next_questions(4)
    guess = run.guess(asked)
    assert shapes == []                                    # the ranking's forward, not another
    fresh = policy_probs(run.inputs(asked))
    assert torch.allclose(guess, fresh, atol=1e-5)
    labels = torch.tensor([run.ds.labels[i] for i in asked])
    agreement = (fresh.argmax(1) == labels).float().mean().item()
    rm_acc = (learner.predicted_rewards(run.inputs(asked)).argmax(1) == labels).float().mean().item()
    for index, p in zip(asked, guess):
        give_answer(run, index, run.ds.labels[index], p)
    metrics = run.update()
    assert metrics["agreement"] == agreement and metrics["rm_acc"] == rm_acc  # as fresh forwards would score
    assert len(asked) not in shapes                        # and the new answers were not scored again
    shapes.clear()
    learner.recompute_batchnorm([run.inputs(asked)])       # a model changed: what it said before is gone
    run.guess(run.next_questions(2))
    assert shapes == [2]
