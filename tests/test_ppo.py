"""PPO maths against hand-computed values, and a toy bandit that PPO must solve."""
import math

import pytest
import torch
import torch.nn.functional as F

from ppo import LoggedActions, advantages, logged_weights, ppo_loss, ppo_update
from run_config import PPOConfig


def cfg(**kw):
    return PPOConfig(**{"ent_coef": 0.0, "kl_coef": 0.0, "norm_adv": False, **kw})


def test_advantage_is_reward_minus_expected_reward_under_old_policy():
    rewards = torch.tensor([[1.0, -1.0]])
    old = torch.tensor([[0.25, 0.75]])
    # baseline = 0.25 * 1 + 0.75 * -1 = -0.5
    assert torch.allclose(advantages(rewards, old), torch.tensor([[1.5, -0.5]]))


@pytest.mark.parametrize("surrogate", ["expected", "sampled"])
def test_first_ratio_is_one_and_nothing_is_clipped(surrogate):
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    old = F.log_softmax(logits, -1)
    rewards = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    _, stats = ppo_loss(logits, old, rewards, torch.tensor([0, 1]), cfg(surrogate=surrogate))
    assert stats["clipfrac"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-7


def test_expected_surrogate_value_matches_hand_computation():
    # one image, old policy (0.25, 0.75), new policy (0.5, 0.5), person answered class 0.
    old = torch.log(torch.tensor([[0.25, 0.75]]))
    new_logits = torch.log(torch.tensor([[0.5, 0.5]]))
    rewards = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo_loss(new_logits, old, rewards, torch.tensor([0]), cfg(clip_coef=0.2))
    # adv = (1.5, -0.5); ratios = (2.0, 2/3); clipped to (1.2, 0.8)
    # class 0: min(2.0*1.5, 1.2*1.5) = 1.8 ; class 1: min(2/3*-0.5, 0.8*-0.5) = -0.4
    expected = -(0.25 * 1.8 + 0.75 * -0.4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1.0)  # both ratios left [0.8, 1.2]


def _grad_of_logit(ratio, adv_sign):
    """d loss / d new logit of the sampled class, for a sampled-surrogate case with a given ratio."""
    old_p = 0.5
    new_p = old_p * ratio
    logit = torch.tensor([math.log(new_p), math.log(1 - new_p)], requires_grad=True)
    old = torch.log(torch.tensor([[old_p, 1 - old_p]]))
    # reward vector chosen so the sampled class's advantage has the wanted sign
    rewards = torch.tensor([[1.0, -1.0]]) if adv_sign > 0 else torch.tensor([[-1.0, 1.0]])
    loss, _ = ppo_loss(logit[None], old, rewards, torch.tensor([0]), cfg(surrogate="sampled", clip_coef=0.2))
    loss.backward()
    return logit.grad[0].item()


def test_clipping_cuts_the_gradient_only_on_the_side_the_advantage_pushes_towards():
    # positive advantage: ratio above 1+eps gets no more push; below 1-eps it still does
    assert _grad_of_logit(1.5, +1) == 0.0
    assert _grad_of_logit(0.5, +1) != 0.0
    # negative advantage: ratio below 1-eps gets no more push; above 1+eps it still does
    assert _grad_of_logit(0.5, -1) == 0.0
    assert _grad_of_logit(1.5, -1) != 0.0
    # inside the trust region both signs get a gradient
    assert _grad_of_logit(1.05, +1) != 0.0 and _grad_of_logit(1.05, -1) != 0.0


def test_kl_to_reference_term_matches_hand_value():
    new_logits = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.9, 0.1]]))
    old = new_logits.clone()
    rewards = torch.tensor([[1.0, -1.0]])
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    loss0, stats = ppo_loss(new_logits, old, rewards, torch.tensor([0]), cfg(kl_coef=0.0), ref_logprobs=ref)
    loss1, _ = ppo_loss(new_logits, old, rewards, torch.tensor([0]), cfg(kl_coef=0.5), ref_logprobs=ref)
    assert stats["kl_ref"] == pytest.approx(kl, abs=1e-6)
    assert (loss1 - loss0).item() == pytest.approx(0.5 * kl, abs=1e-6)


@pytest.mark.parametrize("surrogate", ["expected", "sampled"])
def test_batch_of_one_with_normalisation_has_no_nan(surrogate):
    policy = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    x = torch.randn(1, 3)
    stats = ppo_update(policy, opt, x, torch.tensor([[1.0, -1.0]]), cfg(norm_adv=True, surrogate=surrogate),
                       generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_target_kl_stops_the_passes_early():
    policy = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(policy.parameters(), lr=5.0)
    x = torch.randn(16, 4)
    rewards = 2 * F.one_hot(torch.randint(0, 3, (16,)), 3).float() - 1
    stats = ppo_update(policy, opt, x, rewards, cfg(update_epochs=10, target_kl=1e-4, max_grad_norm=100.0),
                       generator=torch.Generator().manual_seed(0))
    assert stats["update_epochs_run"] < 10


@pytest.mark.parametrize("surrogate", ["expected", "sampled"])
def test_toy_bandit_converges_to_the_rewarded_class(surrogate):
    """Contexts are one-hot vectors; the rewarded class of context c is (c + 1) % 3."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    policy = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    config = cfg(surrogate=surrogate, ent_coef=0.001, num_minibatches=2)
    for _ in range(60):
        ctx = torch.randint(0, 3, (16,), generator=gen)
        x = F.one_hot(ctx, 3).float()
        rewards = 2 * F.one_hot((ctx + 1) % 3, 3).float() - 1
        ppo_update(policy, opt, x, rewards, config, generator=gen)
    probs = torch.softmax(policy(torch.eye(3)), -1)
    best = probs[torch.arange(3), (torch.arange(3) + 1) % 3]
    assert (best > 0.9).all(), probs


def test_a_verdicts_row_learns_its_logged_class_weighted_by_old_over_behaviour_probability():
    # one image, 3 classes; the person said no to class 2, which a proposing snapshot gave probability 0.5
    old = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    new_logits = torch.log(torch.tensor([[0.25, 0.30, 0.45]], dtype=torch.float64)).requires_grad_()
    rm_rewards = torch.tensor([[0.2, -0.4, -0.6]], dtype=torch.float64)
    logged = logged_weights(LoggedActions(torch.tensor([True]), torch.tensor([2]), torch.tensor([0.25]), rm_rewards),
                            old, cfg(is_truncation=1.5))
    weight, baseline = logged.is_weight, logged.baseline
    # old/behaviour = 0.5/0.25 = 2, cut at 1.5; baseline = 0.2*0.2 + 0.3*(-0.4) + 0.5*(-0.6) = -0.38
    assert weight.item() == pytest.approx(1.5) and baseline.item() == pytest.approx(-0.38)
    rewards = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, stats = ppo_loss(new_logits, old, rewards, torch.tensor([2]), cfg(clip_coef=0.2, ent_coef=0.0),
                           logged=logged)
    ratio, adv = 0.45 / 0.5, -1.0 + 0.38   # inside the clip range; advantage -0.62
    assert stats["policy_loss"] == pytest.approx(-1.5 * ratio * adv)
    loss.backward()
    assert new_logits.grad[0, 2] > 0  # descending the loss lowers the rejected class's logit
