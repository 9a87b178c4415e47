"""The reward model learns the person's answers; the policy learns from them through PPO."""
import torch

from conftest import make_subset
from dataset import AntBeeDataset
from learner import Learner, RewardModelConfig, one_hot_rewards, reliability
from ppo import PPOConfig


def test_one_hot_rewards_follow_the_plus_minus_one_rule():
    r = one_hot_rewards(torch.tensor([1, 0]), 3)
    assert r.tolist() == [[-1, 1, -1], [1, -1, -1]]


def test_reward_model_fits_the_answers_it_was_given(tmp_path, digits):
    ds = AntBeeDataset(make_subset(tmp_path / "d", digits, 6, classes=["0", "1", "7"]), image_size=32)
    answers = torch.tensor(ds.labels)
    learner = Learner(ds.num_classes, None, "all", PPOConfig(), RewardModelConfig(rm_learning_rate=1e-3), seed=0)
    x = ds.batch(list(range(len(ds))))
    for _ in range(15):
        learner.update(x, answers)
    predicted = learner.predicted_rewards(x)
    assert (predicted.argmax(1) == answers).float().mean().item() == 1.0
    # the predicted reward is highest (+ side) for the answered class and negative for the others
    assert (predicted.gather(1, answers[:, None]) > 0).all()


def test_policy_learns_answered_images_and_update_counts_versions(tmp_path, digits):
    ds = AntBeeDataset(make_subset(tmp_path / "d", digits, 6, classes=["0", "1"]), image_size=32)
    answers = torch.tensor(ds.labels)
    learner = Learner(2, None, "all", PPOConfig(learning_rate=1e-3), RewardModelConfig(), seed=0)
    x = ds.batch(list(range(len(ds))))
    for _ in range(10):
        stats = learner.update(x, answers, x_unanswered=x[:4])
    assert learner.version == 10
    assert stats["rm_images"] == 4
    assert (learner.policy_probs(x).argmax(1) == answers).float().mean().item() >= 0.9


def test_head_finetuning_trains_only_the_head():
    learner = Learner(2, None, "head", seed=0)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    x = learner.encode(torch.randn(4, 3, 32, 32))  # the frozen layers' output, as the feature cache holds
    assert x.shape == (4, 512)
    learner.update(x, torch.tensor([0, 1, 0, 1]))
    after = learner.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.fc.weight", "model.fc.bias"}


def test_reliability_is_zero_at_chance_and_grows_with_proven_accuracy():
    assert reliability([1, 0] * 16, 2, 16) == 0.0          # a coin's record earns no trust
    assert reliability([1] * 10, 2, 16) == 0.0             # too few answers to judge
    assert reliability([1, 1, 1, 0] * 8, 2, 16) > 0.2      # right 75% of the time, measured on 32
    assert reliability([1] * 64, 2, 16) == 1.0
    assert reliability([1, 0, 0] * 10, 3, 16) == 0.0       # a third right is chance among 3 classes


def test_a_reward_model_no_better_than_chance_does_not_train_the_policy_and_the_record_is_saved():
    torch.manual_seed(0)
    learner = Learner(2, None, "all", PPOConfig(), RewardModelConfig(rm_min_answers=8), seed=0)
    x, answers = torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    learner.rm_fresh = [1, 0] * 8
    stats = learner.update(x, answers, x_unanswered=x[:4], fresh=torch.zeros(8, dtype=torch.bool))
    assert stats["rm_weight"] == 0.0 and stats["rm_images"] == 0
    assert "rm_acc" not in stats                          # no fresh answers: nothing new was measured
    learner.rm_fresh = [1] * 16
    stats = learner.update(x, answers, x_unanswered=x[:4], fresh=torch.zeros(8, dtype=torch.bool))
    assert stats["rm_weight"] == 1.0 and stats["rm_images"] == 4
    resumed = Learner(2, None, "all", seed=1)
    resumed.load_state_dict(learner.state_dict())
    assert resumed.rm_fresh == learner.rm_fresh and resumed.rm_reliability() == 1.0
