"""The loop's owner, RLHFRun: answers, undo and updates as every driver (headless, window, bench) sees them."""
import torch

from conftest import DIGITS, make_subset
from dataset import AntBeeDataset
from feedback_store import FeedbackStore
from learner import Learner, RewardModelConfig
from rlhf_run import RLHFRun
from run_config import RunConfig

GUESS = torch.tensor([0.7, 0.3])  # the guess shown with every answer: class 0


def make_run(tmp_path, **cfg):
    ds = AntBeeDataset(make_subset(tmp_path / "pool", DIGITS, 12, classes=["3", "8"]), image_size=32)
    config = RunConfig(images=ds.root, seed=3, out=str(tmp_path), checkpoint_every=0, **cfg)
    learner = Learner(2, None, "all", config.ppo, config.rm, seed=0)
    return RLHFRun(config, ds, learner, FeedbackStore(str(tmp_path / "f.sqlite")), str(tmp_path), "random")


def answer(run, n):
    asked = run.next_questions(n)
    for index in asked:
        run.record(index, run.ds.labels[index], GUESS, run.learner.version)
    return asked


def test_replay_draws_only_answers_the_reward_model_was_fitted_on(tmp_path):
    run = make_run(tmp_path, batch_size=4, order="random")
    replays = []
    update = run.learner.update
    run.learner.update = lambda x_new, a_new, x_rep, a_rep, *rest, **kw: (replays.append(len(a_rep)),
                                                                         update(x_new, a_new, x_rep, a_rep, *rest, **kw))[1]
    answer(run, 10)        # 10 answers queued: the first update takes 4, six wait
    run.update()
    assert replays == [0]  # nothing fitted before: the six waiting answers are not replayed
    run.update()
    assert replays[-1] == 4 and run.rm_fitted == set(run.pending) ^ set(run.answer_of)


def test_store_and_metrics_speak_of_the_guess_the_person_was_shown(tmp_path):
    run = make_run(tmp_path, batch_size=4, order="sequential")
    asked = answer(run, 4)
    metrics = run.update()
    rows = run.store.rows()
    assert [r["predicted"] for r in rows] == [0] * 4 and all(r["probability"] == GUESS[0].item() for r in rows)
    assert [r["reward"] for r in rows] == [1.0 if run.ds.labels[i] == 0 else -1.0 for i in asked]
    assert metrics["mean_reward"] == sum(r["reward"] for r in rows) / 4


def test_undo_of_a_trained_answer_refits_the_reward_model_and_asks_it_again(tmp_path):
    run = make_run(tmp_path, batch_size=4, order="sequential")
    asked = answer(run, 4)
    run.update()
    before = {k: v.clone() for k, v in run.learner.reward_model.state_dict().items()}
    assert run.undo(asked[-1]) is True                     # the reward model had learnt it
    assert asked[-1] not in run.answer_of and len(run.store.rows()) == 3
    run.refit_reward_model()
    after = run.learner.reward_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not run.questions_done()                        # handed out again: the window asks it once more
    asked_again = answer(run, 1)
    assert asked_again != [asked[-1]]                      # the next question is a new image ...
    run.record(asked[-1], 1, GUESS, run.learner.version)   # ... and the undone one is answered again
    assert run.answer_of[asked[-1]] == 1 and asked[-1] in run.pending


def test_disagreement_counts_only_once_the_reward_model_has_earned_trust(tmp_path):
    run = make_run(tmp_path, explore=0.0)
    pool = list(range(len(run.ds)))
    run.learner.predicted_rewards = lambda x: torch.tensor([[1.0, -1.0]] * x.shape[0])  # it always says 0
    run.learner.policy_probs = lambda x: torch.tensor([[0.3, 0.7]] * (x.shape[0] // 2) + [[0.6, 0.4]] * (x.shape[0] - x.shape[0] // 2))
    untrusted = run.rank_questions(pool, None)
    run.learner.rm_record = [(1, a) for a in [0, 1] * 32]
    trusted = run.rank_questions(pool, None)
    half = len(pool) // 2
    assert untrusted[:half] == pool[half:]   # smallest margin first (0.2 < 0.4): the untrusted reward model is ignored
    assert trusted[:half] == pool[:half]     # the policy says 1, a trusted reward model 0: least sure first


def test_the_reward_model_measures_itself_on_answers_before_it_is_fitted_on_them(tmp_path):
    run = make_run(tmp_path, batch_size=4, order="sequential", rm=RewardModelConfig(rm_min_answers=4))
    answer(run, 4)
    first = run.update()
    assert "rm_acc" in first and len(run.learner.rm_record) == 4
    run.finish_epoch()                       # a second epoch revisits the same answers: nothing fresh
    assert len(run.learner.rm_record) == 4
