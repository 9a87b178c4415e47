"""Verdicts as evidence: the posterior, the flip-rate estimate, the unbiased measure of the reward model, the
bounded reward-model loss, and what the loop asks with them."""
import json
import math
import random

import pytest
import torch

from answer_ledger import AnswerLedger
from learner import Learner, reward_model_loss, snips_reliability
from run_config import RewardModelConfig
from test_rlhf_run import make_run
from verdict_posterior import DEFAULT_FLIP_RATE, estimate_flip_rate, net_verdicts, posterior, snips_accuracy


def test_the_posterior_of_a_yes_a_no_and_two_verdicts_matches_a_hand_computation():
    prior, eps = [0.5, 0.3, 0.2], 0.1
    # a yes to class 1: its odds times 0.9 / 0.1 = 9
    post = posterior(prior, net_verdicts([(1, 1)], 3), eps)
    z = 0.5 + 0.3 * 9 + 0.2
    assert post == pytest.approx([0.5 / z, 2.7 / z, 0.2 / z])
    # a no to class 0: its odds divided by 9
    post = posterior(prior, net_verdicts([(0, 0)], 3), eps)
    z = 0.5 / 9 + 0.3 + 0.2
    assert post == pytest.approx([0.5 / 9 / z, 0.3 / z, 0.2 / z])
    # a no to 0, then a yes to 1 on the same image
    post = posterior(prior, net_verdicts([(0, 0), (1, 1)], 3), eps)
    z = 0.5 / 9 + 2.7 + 0.2
    assert post == pytest.approx([0.5 / 9 / z, 2.7 / z, 0.2 / z])
    # a yes and a no to the same class cancel: the prior again
    assert posterior(prior, net_verdicts([(2, 1), (2, 0)], 3), eps) == pytest.approx(prior)


def test_a_rejected_class_keeps_a_bounded_share_and_comes_back_when_the_prior_is_sure_of_it():
    # the model is sure of class 0; one no to it: a slip is likelier than the model being that wrong
    post = posterior([0.98, 0.01, 0.01], net_verdicts([(0, 0)], 3), 0.05)
    assert post[0] == pytest.approx(0.98 * 0.05 / 0.95 / (0.98 * 0.05 / 0.95 + 0.02))
    assert max(range(3), key=post.__getitem__) == 0


def test_the_ledger_keeps_each_images_evidence_and_undo_takes_it_back():
    ledger = AnswerLedger(3)
    ledger.add_verdict("a", 0, 0.5, 0, 0)
    key = ledger.add_verdict("a", 1, 0.5, 1, 0).key
    assert ledger.net_verdicts("a") == [-1, 1, 0] and ledger.verdict_count("a") == 2
    ledger.undo_verdict(key)
    assert ledger.net_verdicts("a") == [-1, 0, 0] and ledger.net_verdicts("b") == [0, 0, 0]


def flipped_stream(eps, n, seed):
    """(q, verdict) of n verdicts on proposals drawn from a calibrated model, each flipped with rate eps."""
    rng, k, scored = random.Random(seed), 10, []
    for _ in range(n):
        # a calibrated model: its probabilities, then the image's class drawn from them
        weights = [rng.gammavariate(0.3, 1.0) for _ in range(k)]
        q = [w / sum(weights) for w in weights]
        truth, proposed = rng.choices(range(k), q)[0], rng.choices(range(k), q)[0]
        scored.append((q[proposed], int((proposed == truth) != (rng.random() < eps))))
    return scored


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_the_flip_rate_is_estimated_within_three_points_from_2000_verdicts(eps):
    assert abs(estimate_flip_rate(flipped_stream(eps, 2000, int(eps * 100))) - eps) <= 0.03


def test_verdicts_an_untrusted_model_scored_leave_the_flip_rate_at_its_prior():
    scored = flipped_stream(0.2, 2000, 7)
    assert estimate_flip_rate([(q, v, 0.0) for q, v in scored]) == pytest.approx(DEFAULT_FLIP_RATE)
    half = estimate_flip_rate([(q, v, 0.5) for q, v in scored])  # counted at half: the prior weighs twice as much
    assert estimate_flip_rate(scored) > half > 0.15
    # the trusted half of a stream decides: untrusted rows at another rate move it less than a point
    mixed = [(q, v, 1.0) for q, v in scored] + [(q, v, 0.0) for q, v in flipped_stream(0.0, 2000, 8)]
    assert abs(estimate_flip_rate(mixed) - estimate_flip_rate(scored)) < 0.01


def test_snips_matches_a_hand_computation():
    # verdicts on proposals of the model's top class: yes with weights 2 and 4, no with weight 1.25
    record = [(1, 2.0), (1, 4.0), (0, 1.25)]
    accuracy, n_eff = snips_accuracy(record)
    assert accuracy == pytest.approx(6.0 / 7.25)
    assert n_eff == pytest.approx(7.25 ** 2 / (4 + 16 + 1.5625))
    # slips undone: a yes-rate y at eps comes from an accuracy (y - eps) / (1 - 2 eps)
    assert snips_accuracy(record, 0.1)[0] == pytest.approx((6.0 / 7.25 - 0.1) / 0.8)


def test_snips_trust_is_zero_at_chance_one_in_k_and_grows_with_accuracy():
    coin = [(1, 2.0), (0, 2.0)] * 16  # half right among 2 classes
    assert snips_reliability(coin, 2, 16, 0.0) == 0.0
    good = [(1, 1.5)] * 60 + [(0, 1.5)] * 4
    assert snips_reliability(good, 10, 16, 0.0) > 0.8
    assert snips_reliability(good[:10], 10, 16, 0.0) == 0.0  # too few to judge


def test_the_reward_models_verdict_loss_is_bounded_by_the_flip_rate():
    logits = torch.log(torch.tensor([[0.999, 0.0005, 0.0005]] * 2))
    classes, rejected, verdict = torch.tensor([1, 0]), torch.tensor([False, True]), torch.tensor([True, True])
    hard = reward_model_loss(logits, classes, rejected)
    soft = reward_model_loss(logits, classes, rejected, verdict, eps=0.05)
    assert hard.min().item() > 6.9                             # a confident model told otherwise: -log 0.001
    assert soft[0].item() == pytest.approx(-math.log(0.95 * 0.0005 + 0.05 * 0.9995), rel=1e-4)  # a yes to 1
    assert soft[1].item() == pytest.approx(-math.log(0.05 * 0.999 + 0.95 * 0.001), rel=1e-4)    # a no to 0
    assert soft.max().item() < -math.log(0.05)
    labels = reward_model_loss(logits, classes, rejected, torch.tensor([False, True]), eps=0.05)
    assert labels[0].item() == pytest.approx(hard[0].item())   # a label keeps its cross-entropy


def test_fresh_verdicts_feed_the_flip_rate_and_the_unbiased_record():
    learner = Learner(3, None, "head", seed=0)
    learner.predicted_rewards = lambda x: torch.tensor([[0.8, -0.6, -0.2]] * x.shape[0])  # P 0.9, 0.2, 0.4
    learner.score_verdicts(torch.zeros(4, 1), torch.tensor([0, 0, 1, 2]), torch.tensor([1, 0, 0, 0]),
                           torch.tensor([0.5, 0.25, 0.4, 0.4]))
    assert learner.verdict_record == [(1, 2.0), (0, 4.0)]  # only proposals of its top class, weighted
    assert [r[0] for r in learner.flip_scores] == pytest.approx([0.9, 0.9, 0.2, 0.4])
    assert [r[2] for r in learner.flip_scores] == [0.0] * 4  # a model never measured is not trusted
    fixed = Learner(3, None, "head", seed=0, rm_cfg=RewardModelConfig(verdict_flip_rate=0.2))
    assert fixed.flip_rate() == pytest.approx(0.2)


def test_a_yes_the_guess_doubted_is_asked_again_and_a_sure_one_is_not(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   rm=RewardModelConfig(verdict_flip_rate=0.05))
    first, second = run.next_questions(2)
    doubted = torch.tensor([0.05, 0.9, 0.05])  # a yes to class 0: posterior 0.05*19/(0.95+0.95) = 0.5
    run.propose(first, doubted)
    run.record_verdict(first, 0, 0.05, 1, 0)
    assert run.answer_of[first] == 0 and first in run.questions.unasked and first in run.questions.confirm
    sure = torch.tensor([0.9, 0.05, 0.05])
    run.propose(second, sure)
    run.record_verdict(second, 0, 0.9, 1, 0)
    assert second not in run.questions.unasked
    handed = run.next_questions(100)
    assert first in handed and second not in handed  # handed out again to confirm, after the epoch's others
    # the confirmation: a yes again settles it
    run.propose(first, doubted)
    run.record_verdict(first, 0, 0.5, 1, 0)
    assert first not in run.questions.unasked and run.ledger.net_verdicts(first) == [2, 0, 0]


def test_a_no_to_the_class_the_model_is_sure_of_can_be_proposed_again(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   propose="greedy", propose_explore=0.0, rm=RewardModelConfig(verdict_flip_rate=0.05))
    index = run.next_question()
    sure = torch.tensor([0.995, 0.0025, 0.0025])
    proposed, _ = run.propose(index, sure)
    run.record_verdict(index, proposed, 1.0, 0, 0)
    assert index in run.questions.unasked                  # not settled by one no
    assert run.propose(index, sure) == (0, pytest.approx(1.0))  # a slip is likelier: asked about 0 again


@pytest.mark.parametrize("reask", ["now", "later"])
def test_an_image_a_no_left_unsettled_is_asked_next_unless_reask_is_later(tmp_path, digits, reask):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential", reask=reask,
                   propose="greedy", propose_explore=0.0, rm=RewardModelConfig(verdict_flip_rate=0.05))
    first, second = run.next_questions(2)
    guess = torch.tensor([0.5, 0.3, 0.2])
    assert run.propose(first, guess)[0] == 0
    run.record_verdict(first, 0, 1.0, 0, 0)
    settled = torch.tensor([0.9, 0.05, 0.05])
    run.propose(second, settled)
    run.record_verdict(second, 0, 1.0, 1, 0)  # a sure yes: settled, never a follow-up
    following = run.next_question()
    if reask == "now":
        assert following == first and run.propose(first, guess)[0] == 1  # the class the no left likeliest
    else:
        assert following not in (first, second)  # the epoch's order goes on


def test_confidence_zero_settles_an_image_with_its_first_yes(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   verdict_confidence=0.0)
    index = run.next_question()
    run.propose(index, torch.tensor([0.05, 0.9, 0.05]))
    run.record_verdict(index, 0, 0.05, 1, 0)
    assert index not in run.questions.unasked and run.answer_of[index] == 0


def separable(n, k, g):
    """Features a head learns at once: class c lights up its own block."""
    classes = torch.arange(n) % k
    x = torch.randn(n, 512, generator=g) * 0.1
    for c in range(k):
        x[classes == c, c * 8:(c + 1) * 8] += 3.0
    return x, classes


def test_two_half_fits_scoring_each_others_half_measure_a_learnable_task_as_learnable():
    from crossfit_trust import CrossfitHalf, crossfit_records
    g = torch.Generator().manual_seed(0)
    learner = Learner(3, None, "head", seed=0, rm_cfg=RewardModelConfig(verdict_flip_rate=0.05, rm_learning_rate=0.01))
    halves = []
    for _ in range(2):
        x, truth = separable(60, 3, g)
        proposed = torch.where(torch.arange(60) % 2 == 0, truth, (truth + 1) % 3)  # half right, half wrong
        yes = proposed == truth
        halves.append(CrossfitHalf(x, proposed, ~yes, torch.ones(60, dtype=torch.bool), torch.full((60,), 0.5)))
    labels, verdicts = crossfit_records(learner, halves, passes=20)
    assert labels == [] and len(verdicts) >= 40
    assert sum(y for y, _ in verdicts) / len(verdicts) > 0.9 and all(w == 2.0 for _, w in verdicts)
    learner.verdict_record = verdicts
    assert learner.rm_reliability() > 0.5
    small = [CrossfitHalf(h.x[:5], h.classes[:5], h.rejected[:5], h.verdict[:5], h.behaviour[:5]) for h in halves]
    assert crossfit_records(learner, small) is None  # too few to fit


def test_a_verdict_run_ends_its_epoch_with_a_remeasured_reward_model(tmp_path, digits):
    from rlhf_run import run_headless
    from simulated_labeler import FolderLabeler
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", epochs=1, image_size=32,
                   max_answers=40)
    run_headless(run, FolderLabeler(run.ds, 0.0, 0.0, 0))
    assert run.ledger.given() == 40 and run.learner.verdict_record
    assert all(w >= 1.0 for _, w in run.learner.verdict_record)
    with open(tmp_path / "metrics.jsonl") as f:
        rates = [m["flip_rate"] for m in map(json.loads, f) if "update" in m and not m.get("epoch_end")]
    assert rates and all(0.0 < r < 0.5 for r in rates)  # the flip rate, as estimated, in every update's line


def test_an_epoch_end_with_nothing_new_said_keeps_the_last_remeasure(tmp_path, digits, monkeypatch):
    import rlhf_run
    from simulated_labeler import FolderLabeler
    fits = []
    real = rlhf_run.crossfit_records
    monkeypatch.setattr(rlhf_run, "crossfit_records", lambda *a, **k: fits.append(1) or real(*a, **k))
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", epochs=2, image_size=32,
                   max_answers=40)
    rlhf_run.run_headless(run, FolderLabeler(run.ds, 0.0, 0.0, 0))
    # the budget was spent in the first epoch: the second epoch's end would refit the very same rows
    assert run.epoch == 2 and run.ledger.given() == 40 and len(fits) == 1 and run.learner.verdict_record
    unasked = next(i for i in range(len(run.ds)) if not run.ledger.verdict_count(i))
    rlhf_run.give_verdict(run, unasked, 0, 1.0 / 3, run.ds.labels[unasked] == 0)
    rlhf_run.remeasure_reward_model(run)  # a verdict since: measured again
    rlhf_run.remeasure_reward_model(run)
    assert len(fits) == 2


def test_a_checkpoint_from_before_the_flip_rate_resumes_with_the_default_and_empty_records():
    learner = Learner(3, None, "head", seed=0)
    learner.flip_scores, learner.verdict_record = [(0.9, 0, 1.0), (0.2, 1, 0.5)], [(1, 2.0)]
    state = learner.state_dict()
    resumed = Learner(3, None, "head", seed=0)
    resumed.load_state_dict(state)
    assert resumed.verdict_record == [(1, 2.0)]
    assert resumed.flip_rate() == pytest.approx(estimate_flip_rate(learner.flip_scores))
    old = {k: v for k, v in state.items() if k not in ("verdict_record", "flip_scores")}
    before = Learner(3, None, "head", seed=0)
    before.load_state_dict(old)
    assert before.verdict_record == [] and before.flip_scores == [] and before.flip_rate() == DEFAULT_FLIP_RATE
