"""--policy-update optimum: the targets against hand computations, and the fit reaching them."""
import math

import pytest
import torch

from learner import Learner, UpdateBatch, VerdictBatch, optimum_rows
from optimum_fit import confidence, optimum_targets, optimum_update, reward_model_log_rewards
from run_config import PPOConfig, RewardModelConfig, RunConfig


def test_the_optimum_is_the_reference_reweighted_by_exp_reward_over_beta():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    r = torch.tensor([[1.0, -1.0, -1.0]])
    pi = optimum_targets(ref, r, beta=0.5)
    z = 0.5 * math.exp(2) + 0.25 * math.exp(-2) * 2
    assert pi[0].tolist() == pytest.approx([0.5 * math.exp(2) / z, 0.25 * math.exp(-2) / z, 0.25 * math.exp(-2) / z])
    q = torch.tensor([[0.2, 0.3, 0.5]])
    assert optimum_targets(ref, reward_model_log_rewards(q), 1.0)[0].tolist() == pytest.approx(
        [0.1 / 0.3, 0.075 / 0.3, 0.125 / 0.3])                # pi_ref * q, normalised
    no = optimum_targets(ref, reward_model_log_rewards(q, torch.tensor([2])), 1.0)[0]
    assert no.tolist() == pytest.approx([0.1 / 0.175, 0.075 / 0.175, 0.0])  # the rejected class is gone


def test_confidence_is_zero_for_a_uniform_guess_and_one_for_a_certain_one():
    c = confidence(torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]]))
    assert c.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_the_fit_moves_the_policy_to_the_targets_on_a_fixed_batch():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 4)
    x = torch.randn(12, 16)
    targets = torch.softmax(torch.randn(12, 4) * 2, dim=-1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    cfg = PPOConfig(update_epochs=4, max_grad_norm=100.0)


    def kl_now():
        logp = torch.log_softmax(head(x), dim=-1)
        return (targets * (targets.log() - logp)).sum(dim=-1).mean().item()

    before = kl_now()
    first = optimum_update(head, opt, x, targets, torch.ones(12), cfg)
    for _ in range(40):
        last = optimum_update(head, opt, x, targets, torch.ones(12), cfg)
    assert kl_now() < 0.02 < before
    # the reported KL is the last pass's own, read before its step: between the KL before and after that step
    assert last["kl_to_optimum"] < 0.02 < first["kl_to_optimum"] < before


def test_a_look_alike_prior_multiplies_the_reward_models_guess_in_an_unanswered_images_target():
    learner = Learner(3, None, "head", PPOConfig(policy_update="optimum"), RewardModelConfig(verdict_flip_rate=0.1),
                      seed=0)
    x = torch.randn(5, 512)
    no = VerdictBatch(x[4:], torch.tensor([0]), torch.tensor([0.5]), x[:0], torch.tensor([], dtype=torch.long),
                      evidence=torch.tensor([[-1.0, 0.0, 0.0]]))
    batch = UpdateBatch(x[:2], torch.tensor([1, 2]), x_unanswered=x[2:4], no=no, yes_new=torch.tensor([True, False]),
                        evidence_new=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    _, plain, plain_w, _ = optimum_rows(learner, batch)
    prior = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    batch.prior_unanswered = prior
    _, targets, weights, _ = optimum_rows(learner, batch)
    q, ref = learner.rm_probs(x[2:4]), learner.reference_logprobs(x[2:4])
    assert torch.allclose(targets[2:4], torch.softmax(ref + torch.log(q * prior), dim=1), atol=1e-5)  # pi_ref q prior
    sure = q * prior
    assert torch.allclose(weights[2:4], confidence(sure / sure.sum(1, keepdim=True)), atol=1e-6)
    # the answered rows keep the person's evidence alone
    assert torch.equal(targets[[0, 1, 4]], plain[[0, 1, 4]]) and torch.equal(weights[[0, 1, 4]], plain_w[[0, 1, 4]])
    batch.prior_unanswered = torch.full((2, 3), 1 / 3)  # a uniform prior says nothing
    _, flat, flat_w, _ = optimum_rows(learner, batch)
    assert torch.allclose(flat, plain, atol=1e-6) and torch.allclose(flat_w, plain_w, atol=1e-6)


def test_the_learner_fits_labels_and_lowers_a_rejected_class():
    cfg = PPOConfig(policy_update="optimum", learning_rate=1e-2)
    learner = Learner(3, None, "head", cfg, seed=0)
    x = torch.randn(4, 512)
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(5):
        stats = learner.update(UpdateBatch(x, labels))
    assert "kl_to_optimum" in stats and learner.version == 5
    assert (learner.policy_probs(x).argmax(1) == labels).all()
    y = torch.randn(1, 512)
    before = learner.policy_probs(y)[0, 1].item()
    no = VerdictBatch(y, torch.tensor([1]), torch.tensor([0.5]), y[:0], torch.tensor([], dtype=torch.long))
    for _ in range(3):
        learner.update(UpdateBatch(x[:0], labels[:0], no=no))
    assert learner.policy_probs(y)[0, 1].item() < before


def test_a_headless_verdict_run_with_the_optimum_update_trains_every_image(tmp_path, digits):
    from conftest import make_subset, metrics, run_cli
    pool = make_subset(tmp_path / "pool", digits, 4, classes=["1", "4", "7"])
    flags = ["--images", pool, "--out", tmp_path / "run", "--feedback", "folder", "--image-size", "16", "--weights",
             "none", "--batch-size", "4", "--ask", "verdict", "--policy-update", "optimum", "--max-answers", "8",
             "--noise-kind", "slip", "--feedback-noise", "0.2"]
    proc = run_cli("train_rlhf.py", *flags, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    rows = metrics(tmp_path / "run")
    assert all("kl_to_optimum" in r for r in rows)
    assert sum(r["rm_images"] for r in rows) >= 12 - 8  # the unanswered images learn from the reward model
    assert sum(r["replay_images"] for r in rows) > 0    # and the policy meets its answers again


@pytest.mark.parametrize("update", ["optimum", "ppo"])
def test_the_policy_is_fitted_to_the_replayed_answers_unless_policy_replay_is_off(update):
    x_new, x_old = torch.randn(2, 512), torch.randn(6, 512)
    new, old = torch.tensor([0, 1]), torch.tensor([2, 2, 1, 0, 2, 1])
    for replay in (True, False):
        cfg = PPOConfig(learning_rate=1e-2, policy_replay=replay, policy_update=update)
        learner = Learner(3, None, "head", cfg, seed=0)
        for _ in range(8):
            stats = learner.update(UpdateBatch(x_new, new, x_replay=x_old, answers_replay=old))
        learnt = (learner.policy_probs(x_old).argmax(1) == old).float().mean().item()
        assert stats["replay_images"] == (6 if replay else 0)
        assert learnt == 1.0 if replay else learnt < 1.0  # without replay it never saw them


def test_each_updater_takes_its_own_passes_unless_update_epochs_is_given():
    head, x = torch.nn.Linear(16, 4), torch.randn(8, 16)
    targets = torch.softmax(torch.randn(8, 4), dim=-1)
    steps = []
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    opt.register_step_post_hook(lambda *a: steps.append(1))
    assert optimum_update(head, opt, x, targets, torch.ones(8), PPOConfig())["update_epochs_run"] == 2
    assert len(steps) == 2
    assert PPOConfig(policy_update="ppo").passes() == 4          # CleanRL's, the original design's updater
    assert PPOConfig(update_epochs=4).passes() == 4               # given: as given, for either updater
    # a run made before keeps the passes its config.json holds
    assert RunConfig.from_flat({**RunConfig().to_flat(), "update_epochs": 4}).ppo.passes() == 4


def test_the_reference_is_asked_about_each_pool_image_once_and_says_the_same():
    learner = Learner(3, None, "head", PPOConfig(policy_update="optimum"), seed=0)
    x = torch.randn(6, 512)
    forwards = []
    learner.reference_net.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    fresh = learner.reference_logprobs(x)
    assert torch.equal(learner.reference_logprobs(x[:4], images=[10, 11, 12, 13]), fresh[:4])
    # two rows kept, two new: only the new ones go through the network
    assert torch.equal(learner.reference_logprobs(x[2:], images=[12, 13, 14, 15]), fresh[2:])
    assert forwards == [6, 4, 2]
    # an update given its rows' pool images learns exactly what it learns without them
    twin = Learner(3, None, "head", PPOConfig(policy_update="optimum"), seed=0)
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        learner.update(UpdateBatch(x[:4], labels, x_unanswered=x[4:],
                                   images={"new": [10, 11, 12, 13], "replay": [], "unanswered": [14, 15], "no": []}))
        twin.update(UpdateBatch(x[:4], labels, x_unanswered=x[4:]))
    assert torch.equal(learner.policy_probs(x), twin.policy_probs(x))
    assert forwards == [6, 4, 2]  # every row of both updates was kept
