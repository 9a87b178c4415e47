"""The reward model learns the person's answers; the policy learns from them through PPO."""
import math
import random

import pytest
import torch

from conftest import make_subset
from dataset import ImagePool
from learner import Learner, UpdateBatch, one_hot_rewards, reliability, reward_model_loss
from run_config import PPOConfig, RewardModelConfig, RunConfig


def test_one_hot_rewards_follow_the_plus_minus_one_rule():
    r = one_hot_rewards(torch.tensor([1, 0]), 3)
    assert r.tolist() == [[-1, 1, -1], [1, -1, -1]]


def test_reward_model_fits_the_answers_it_was_given(tmp_path, digits):
    ds = ImagePool(make_subset(tmp_path / "d", digits, 6, classes=["0", "1", "7"]), image_size=16)
    answers = torch.tensor(ds.labels)
    # many reward-model steps in each of a few updates: the policy's steps are not what this test is about
    learner = Learner(ds.num_classes, None, "all", PPOConfig(), RewardModelConfig(rm_learning_rate=1e-3, rm_steps=10),
                      seed=0)
    x = ds.batch(list(range(len(ds))))
    for _ in range(6):
        learner.update(UpdateBatch(x, answers))
    predicted = learner.predicted_rewards(x)
    assert (predicted.argmax(1) == answers).float().mean().item() == 1.0
    # the predicted reward is highest (+ side) for the answered class and negative for the others
    assert (predicted.gather(1, answers[:, None]) > 0).all()


def test_policy_learns_answered_images_and_update_counts_versions(tmp_path, digits):
    ds = ImagePool(make_subset(tmp_path / "d", digits, 6, classes=["0", "1"]), image_size=16)
    answers = torch.tensor(ds.labels)
    learner = Learner(2, None, "all", PPOConfig(learning_rate=1e-3), RewardModelConfig(), seed=0)
    x = ds.batch(list(range(len(ds))))
    for _ in range(10):
        stats = learner.update(UpdateBatch(x, answers, x_unanswered=x[:4]))
    assert learner.version == 10
    assert stats["rm_images"] == 4
    assert (learner.policy_probs(x).argmax(1) == answers).float().mean().item() >= 0.9


def test_head_finetuning_trains_only_the_head():
    learner = Learner(2, None, "head", seed=0)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    x = learner.encode(torch.randn(4, 3, 32, 32))  # the frozen layers' output, as the feature cache holds
    assert x.shape == (4, 512)
    learner.update(UpdateBatch(x, torch.tensor([0, 1, 0, 1])))
    after = learner.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.fc.weight", "model.fc.bias"}


def test_reliability_is_zero_at_chance_and_grows_with_proven_accuracy():
    balanced = [0, 1] * 32
    assert reliability(list(zip([1, 0] * 16, balanced)), 2, 16) == 0.0        # a coin's record earns no trust
    assert reliability(list(zip([1] * 10, balanced)), 2, 16) == 0.0           # too few answers to judge
    assert reliability(list(zip([1, 1, 1, 1, 1, 1, 1, 0] * 8, balanced)), 2, 16) > 0.3  # 7 in 8, on 64
    assert reliability(list(zip([1] * 64, balanced)), 2, 16) > 0.85
    assert reliability(list(zip([1, 0, 0] * 10, [0, 1, 2] * 10)), 3, 16) == 0.0  # a third right among 3


def test_a_reward_model_no_better_than_chance_does_not_train_the_ppo_policy_and_the_record_is_saved():
    torch.manual_seed(0)  # PPO's gate (the optimum update weighs the reward model per image instead)
    learner = Learner(2, None, "all", PPOConfig(policy_update="ppo"), RewardModelConfig(rm_min_answers=8), seed=0)
    x, answers = torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    learner.rm_record = [(1, 0), (0, 1)] * 8
    stale = UpdateBatch(x, answers, fresh=torch.zeros(8, dtype=torch.bool), x_unanswered=x[:4])
    stats = learner.update(stale)
    assert stats["rm_weight"] == 0.0 and stats["rm_images"] == 0
    assert "rm_acc" not in stats                          # no fresh answers: nothing new was measured
    learner.rm_record = [(1, 0), (1, 1)] * 32
    stats = learner.update(stale)
    assert stats["rm_weight"] > 0.85 and stats["rm_images"] == 4
    resumed = Learner(2, None, "all", seed=1)
    resumed.load_state_dict(learner.state_dict())
    assert resumed.rm_record == learner.rm_record and resumed.rm_reliability() == stats["rm_weight"]


def test_a_coin_flip_reward_model_earns_no_trust_in_at_least_97_percent_of_runs():
    rng = random.Random(0)
    for n in (16, 32, 64):
        trusted = 0
        for _ in range(2000):
            answers = [rng.randrange(2) for _ in range(n)]
            record = [(int(rng.random() < 0.5), a) for a in answers]
            trusted += reliability(record, 2, 16) > 0
        assert trusted / 2000 <= 0.03, (n, trusted)
    # a predictor that always names the commonest class is no better than chance either
    answers = [0] * 12 + [1] * 4
    assert reliability([(int(a == 0), a) for a in answers], 2, 16) == 0.0
    # 16 right out of 16 is good evidence, not certainty
    assert 0.0 < reliability([(1, a) for a in [0, 1] * 8], 2, 16) < 1.0


def test_kl_to_the_reference_is_zero_while_the_policy_equals_it():
    torch.manual_seed(0)
    learner = Learner(2, None, "all", PPOConfig(learning_rate=0.0, update_epochs=1), seed=0)
    stats = learner.ppo_step(torch.randn(8, 3, 32, 32), one_hot_rewards(torch.tensor([0, 1] * 4), 2))
    assert abs(stats["kl_ref"]) < 1e-6 and abs(stats["approx_kl"]) < 1e-6


def test_a_last_minibatch_of_one_image_trains_without_batch_statistics():
    learner = Learner(2, None, "all", PPOConfig(num_minibatches=3, policy_update="ppo"), seed=0)  # minibatches 2, 2, 1
    stats = learner.ppo_step(torch.randn(5, 3, 16, 16), one_hot_rewards(torch.tensor([0, 1, 0, 1, 1]), 2))
    assert learner.version == 1 and stats["update_epochs_run"] == 4


def test_the_reward_model_reads_a_no_as_a_bernoulli_likelihood_on_its_class_probability():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]]))
    loss = reward_model_loss(logits, torch.tensor([1, 1]), torch.tensor([False, True]))
    assert loss[0].item() == pytest.approx(-math.log(0.6), rel=1e-5)       # yes / label: -log p
    assert loss[1].item() == pytest.approx(-math.log(1 - 0.6), rel=1e-5)   # no: -log(1 - p)


def test_the_reward_model_measures_itself_on_verdicts_before_fitting_them():
    learner = Learner(3, None, "head", seed=0)
    x = torch.randn(6, 512)
    learner.predicted_rewards = lambda x: torch.tensor([[0.8, -0.6, -0.2]] * x.shape[0])  # P(yes) 0.9, 0.2, 0.4
    acc = learner.score_verdicts(x, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 0, 1, 0, 0]))
    assert acc == pytest.approx(4 / 6)  # its yes/no predictions, for the metrics
    # its reliability record, as labels would give it: a yes to its likeliest class (0) is a hit on class 0, a
    # no to it a miss of an unknown class, a yes to class 1 a miss on class 1; no's to other classes settle
    # nothing
    assert learner.rm_record == [(1, 0), (0, -1), (0, 1)]


def test_verdicts_earn_the_reward_model_trust_where_a_yes_no_score_would_not():
    # 10 classes, most proposals wrong (a no): a reward model whose likeliest class is right 8 times in 10
    # predicts 'no' for nearly every proposal, which the share of no's alone already does
    learner = Learner(10, None, "head", seed=0)
    g = torch.Generator().manual_seed(0)
    n = 64
    truth = torch.randint(0, 10, (n,), generator=g)
    top = torch.where(torch.arange(n) % 5 < 4, truth, (truth + 1) % 10)
    proposed = torch.where(torch.arange(n) % 10 == 0, truth, (truth + 3) % 10)
    proposed[n // 2:] = top[n // 2:]  # half of them propose its likeliest class
    learner.predicted_rewards = lambda x: 2 * torch.nn.functional.one_hot(top, 10).float() - 1
    learner.score_verdicts(torch.zeros(n, 1), proposed, (proposed == truth).long())
    hits = [h for h, _ in learner.rm_record]
    assert sum(hits) / len(hits) == pytest.approx(0.8, abs=0.1)
    assert learner.rm_reliability() > 0.3


def test_verdicts_that_settle_nothing_leave_the_record_as_it_was():
    learner = Learner(3, None, "head", seed=0)
    learner.predicted_rewards = lambda x: torch.tensor([[0.8, -0.6, -0.2]] * x.shape[0])
    assert learner.score_verdicts(torch.zeros(2, 1), torch.tensor([1, 2]), torch.tensor([0, 0])) == 1.0
    assert learner.rm_record == []


def test_recomputed_batchnorm_statistics_are_those_of_the_images_given():
    torch.manual_seed(0)
    learner = Learner(3, None, "all", seed=0)
    x = torch.randn(16, 3, 32, 32) * 2 + 1
    learner.update(UpdateBatch(x[:4], torch.tensor([0, 1, 2, 0])))  # the running statistics of a few steps
    learner.recompute_batchnorm([x[:8], x[8:]])
    model = learner.policy.model
    with torch.no_grad():
        conv = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model.bn1.running_var, conv.var(dim=(0, 2, 3)), rtol=0.05)
    assert not learner.policy.training and not learner.reward_model.training
    served = learner.average.served().model                         # the served average's, over the same images
    with torch.no_grad():
        conv = served.conv1(x)
    assert served is not model and torch.allclose(served.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4)


def head_weights(model):
    return model.model.fc.weight.detach().clone()


def test_the_served_model_is_the_moving_average_of_the_policys_weights_and_resumes_with_it():
    torch.manual_seed(0)
    cfg = PPOConfig(policy_ema=0.5, policy_ema_debias=False, learning_rate=1e-2)
    learner = Learner(3, None, "head", cfg, seed=0)
    x, labels = torch.randn(6, 512), torch.tensor([0, 1, 2, 0, 1, 2])
    trail = []
    for _ in range(3):
        learner.update(UpdateBatch(x, labels))
        trail.append(head_weights(learner.policy))
    expected = trail[0]                                             # the first update is copied, then folded in
    for w in trail[1:]:
        expected = 0.5 * expected + 0.5 * w
    state = learner.state_dict()
    assert torch.allclose(state["policy"]["model.fc.weight"], expected, atol=1e-6)
    assert torch.equal(state["policy_trained"]["model.fc.weight"], trail[-1])
    assert not torch.allclose(expected, trail[-1], atol=1e-4)       # the served model is not the last update's
    again = Learner(3, None, "head", cfg, seed=1)
    again.load_state_dict(state)
    assert torch.equal(head_weights(again.policy), trail[-1])
    assert torch.allclose(head_weights(again.average.served()), expected, atol=1e-6)
    again.update(UpdateBatch(x, labels))                            # and the average goes on from where it was
    assert torch.allclose(head_weights(again.average.served()),
                          0.5 * expected + 0.5 * head_weights(again.policy), atol=1e-6)


def test_the_debiased_average_weighs_each_update_by_the_decay_powers_and_goes_on_after_a_resume():
    torch.manual_seed(0)
    cfg = PPOConfig(policy_ema=0.9, learning_rate=1e-2)             # --policy-ema-debias is the default
    learner = Learner(3, None, "head", cfg, seed=0)
    x, labels = torch.randn(6, 512), torch.tensor([0, 1, 2, 0, 1, 2])
    trail = []

    def expected():                                                 # sum 0.9^(t-i) w_i / sum 0.9^(t-i)
        powers = [0.9 ** (len(trail) - 1 - i) for i in range(len(trail))]
        return sum(p * w for p, w in zip(powers, trail)) / sum(powers)
    for _ in range(3):
        learner.update(UpdateBatch(x, labels))
        trail.append(head_weights(learner.policy))
    assert torch.allclose(head_weights(learner.average.served()), expected(), atol=1e-6)
    plain = 0.81 * trail[0] + 0.09 * trail[1] + 0.1 * trail[2]      # the rule before: the first update copied
    assert not torch.allclose(expected(), plain, atol=1e-4)
    again = Learner(3, None, "head", cfg, seed=1)
    again.load_state_dict(learner.state_dict())
    again.update(UpdateBatch(x, labels))
    trail.append(head_weights(again.policy))
    assert torch.allclose(head_weights(again.average.served()), expected(), atol=1e-6)


def test_a_run_saved_before_the_debiased_average_resumes_with_the_plain_one():
    saved = {k: v for k, v in RunConfig().to_flat().items() if k != "policy_ema_debias"}
    assert RunConfig.from_flat(saved).ppo.policy_ema_debias is False
    assert RunConfig().ppo.policy_ema_debias is True and RunConfig().ppo.policy_ema == 0.995
    assert RunConfig.from_args(["--policy-ema-debias", "false"]).ppo.policy_ema_debias is False


def test_without_an_average_or_from_an_older_checkpoint_the_policy_itself_is_served():
    x, labels = torch.randn(6, 512), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = Learner(3, None, "head", PPOConfig(policy_ema=0.0), seed=0)
    plain.update(UpdateBatch(x, labels))
    state = plain.state_dict()
    assert "policy_trained" not in state and torch.equal(state["policy"]["model.fc.weight"], head_weights(plain.policy))
    older = {k: v for k, v in state.items() if k != "policy_average"}  # a checkpoint from before the average
    resumed = Learner(3, None, "head", PPOConfig(policy_ema=0.9), seed=1)
    resumed.load_state_dict(older)
    assert resumed.average.served() is resumed.policy and torch.equal(head_weights(resumed.policy),
                                                                      head_weights(plain.policy))
