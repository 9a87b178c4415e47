"""Policy improvement to the KL-regularised optimum (`--policy-update optimum`): for a one-step bandit with K
classes, max_pi E_pi[r] - beta * KL(pi || pi_ref) has the closed-form optimum pi* = pi_ref * exp(r / beta) / Z
per image, so the policy is fitted to pi* by cross-entropy (the policy-improvement step of MPO and AWR) instead
of creeping towards it by clipped surrogate steps. Pure functions on tensors, like ppo.py.

Rewards per image, as the update builds them:
    a label or a yes: +1 on its class, -1 on the others (the original design's rule), beta = --optimum-beta;
    an unanswered image: r = log q, the reward model's class probabilities, beta = 1, so pi* = pi_ref * q;
    a verdict "no": log q with the rejected class removed, so pi* = pi_ref * q on the classes left.
"""
import torch
import torch.nn.functional as F

from ddp import Ranks
from ppo import minibatches


def optimum_targets(ref_logprobs, rewards, beta):
    """pi* of each row: softmax(log pi_ref + r / beta); ref_logprobs, rewards: (N, K)."""
    return torch.softmax(ref_logprobs + rewards / beta, dim=-1)


def reward_model_log_rewards(rm_probs, rejected=None):
    """r = log q of each row (the reward model's class probabilities), with a rejected class (N,) given -inf."""
    r = torch.log(rm_probs.clamp_min(1e-12))
    if rejected is not None:
        r = r.scatter(1, rejected[:, None], float("-inf"))
    return r


def confidence(rm_probs):
    """How sure the reward model is of each row: 1 - entropy / log K (0 for a uniform guess, 1 for one class)."""
    k = rm_probs.shape[-1]
    entropy = -(rm_probs * torch.log(rm_probs.clamp_min(1e-12))).sum(dim=-1)
    return (1.0 - entropy / torch.log(torch.tensor(float(k)))).clamp(0.0, 1.0)


def optimum_update(policy, optimizer, x, targets, weights, cfg, generator=None, ranks=None):
    """cfg.passes() passes of weighted cross-entropy from the policy to the target distributions (N, K),
    over the same shuffled minibatches as ppo_update (BatchNorm in train mode, one image in eval mode);
    returns the mean loss and the weighted KL from the targets as the last pass found it (read from that
    pass's own forwards, before each of its steps: a forward more would cost as much as a step's)."""
    ranks = ranks or Ranks()
    parts, mine = minibatches(x.shape[0], cfg, generator, ranks, x.device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = weights.sum().clamp_min(1e-12)
    log_targets = torch.log(targets.clamp_min(1e-12))
    losses, kl = [], 0.0  # each minibatch's loss: its weighted mean cross-entropy (DDP averages the processes' blocks)
    passes = cfg.passes()
    for epoch in range(passes):
        for j in torch.randperm(len(parts), generator=generator).tolist():
            rows = mine[j]
            policy.train(len(parts[j]) > 1)
            logp = F.log_softmax(policy(x[rows]).to(targets.dtype), dim=-1)
            per_row = -(targets[rows] * logp).sum(dim=-1)
            share = weights[parts[j].to(weights.device)].sum().clamp_min(1e-12)
            loss = (weights[rows] * per_row).sum() / (share / ranks.world)
            if epoch == passes - 1:
                with torch.no_grad():
                    kl += float((weights[rows] * (targets[rows] * (log_targets[rows] - logp)).sum(dim=-1)).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    policy.eval()
    return {"policy_loss": sum(ranks.sum_floats(losses)) / ranks.world / max(1, len(losses)),
            "kl_to_optimum": sum(ranks.sum_floats([kl])) / float(total), "update_epochs_run": passes}
