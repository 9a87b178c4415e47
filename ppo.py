"""PPO for one-step episodes (a contextual bandit): an image is the state, a class the action.

Pure functions on tensors: no I/O, no tkinter, no module-level state. Under torchrun (`ranks`), every
process holds the whole batch, computes its block of each minibatch, and DistributedDataParallel
averages the gradients: the update equals one process's on the whole minibatch. Each answer tells the
reward of every class (+1 for the class the person gave, -1 for the others), so by default the clipped
surrogate is taken in expectation over all classes under the old policy (`surrogate="expected"`), which
is the exact expectation of the usual sampled surrogate and far less noisy. `surrogate="sampled"` is
textbook PPO on the sampled class alone.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddp import Ranks


def advantages(rewards, old_probs):
    """Reward of every class minus the baseline, the expected reward of the image under the old policy."""
    baseline = (old_probs * rewards).sum(dim=-1, keepdim=True)
    return rewards - baseline


def normalize_advantages(adv, weights):
    """Divide by the weighted RMS; mean-zero is already guaranteed by the baseline (weights: (N, K))."""
    rms = torch.sqrt((weights * adv.pow(2)).sum() / weights.sum().clamp_min(1e-12))
    return adv / (rms + 1e-8)


@dataclass
class LoggedActions:
    """Rows learnt from one logged action alone (a verdict "no"): `rows` (N,) bool marks them, `action` (N,) the
    class acted on, `behaviour` (N,) the probability the proposing rule gave it, `rm_rewards` (N, K) the reward
    model's rewards of every class there (the baseline); rows not marked are ignored."""
    rows: torch.Tensor
    action: torch.Tensor
    behaviour: torch.Tensor
    rm_rewards: torch.Tensor

    def to(self, device):
        return LoggedActions(*(t.to(device) for t in (self.rows, self.action, self.behaviour, self.rm_rewards)))


@dataclass
class LoggedWeights:
    """What the loss needs of the logged rows: `rows` (N,) bool, importance weights and baselines (N,)."""
    rows: torch.Tensor
    is_weight: torch.Tensor
    baseline: torch.Tensor

    def __getitem__(self, index):
        return LoggedWeights(self.rows[index], self.is_weight[index], self.baseline[index])


def ppo_loss(new_logits, old_logprobs, rewards, actions, cfg, ref_logprobs=None, denominator=None, logged=None):
    """Clipped-surrogate PPO loss for one minibatch and the statistics CleanRL logs.

    new_logits, old_logprobs, rewards: (N, K); actions: (N,) sampled classes (used when surrogate is
    'sampled', and the logged classes on logged rows); ref_logprobs: (N, K) or None. Per-image terms are
    summed and divided by `denominator` (default N: the mean; a process holding part of a minibatch passes
    minibatch size / processes). logged: None, or the LoggedWeights of rows where only the logged action's
    reward is known (a verdict). Returns (loss, dict of floats).
    """
    denom = float(new_logits.shape[0] if denominator is None else denominator)
    new_logprobs = F.log_softmax(new_logits, dim=-1)
    old_probs = old_logprobs.exp()
    adv = advantages(rewards, old_probs)
    if cfg.surrogate == "expected":
        weights = old_probs
    elif cfg.surrogate == "sampled":
        weights = F.one_hot(actions, rewards.shape[-1]).to(adv.dtype)
    else:
        raise ValueError(f"surrogate must be 'expected' or 'sampled', not {cfg.surrogate!r}")
    if logged is not None:
        acted = F.one_hot(actions, rewards.shape[-1]).to(adv.dtype)
        weights = torch.where(logged.rows[:, None], logged.is_weight[:, None] * acted, weights)
        adv = torch.where(logged.rows[:, None], rewards - logged.baseline[:, None], adv)
    if cfg.norm_adv and adv.shape[0] > 1:
        adv = normalize_advantages(adv, weights)
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef) * adv
    pg_loss = -(weights * torch.min(surr1, surr2)).sum() / denom
    new_probs = new_logprobs.exp()
    entropy = -(new_probs * new_logprobs).sum() / denom
    loss = pg_loss - cfg.ent_coef * entropy
    kl_ref = torch.zeros(())
    if ref_logprobs is not None:
        kl_ref = (new_probs * (new_logprobs - ref_logprobs)).sum() / denom
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl_ref
    with torch.no_grad():
        approx_kl = (old_probs * (old_logprobs - new_logprobs)).sum() / denom
        clipped = ((ratio - 1.0).abs() > cfg.clip_coef).to(adv.dtype)
        clipfrac = (weights * clipped).sum() / denom  # each row's weights sum to 1
    stats = {"policy_loss": pg_loss.item(), "entropy": entropy.item(), "approx_kl": approx_kl.item(),
             "kl_ref": kl_ref.item(), "clipfrac": clipfrac.item()}
    return loss, stats


def logged_weights(logged, old_logprobs, cfg):
    """The LoggedWeights of LoggedActions: the importance weight is old policy / proposing snapshot's
    probability of the logged class, cut at cfg.is_truncation (the snapshot that proposed is older than the
    policy now updated); the baseline is the reward model's expected reward under the old policy."""
    old_probs = old_logprobs.exp()
    ratio = old_probs.gather(1, logged.action[:, None]).squeeze(1) / logged.behaviour.clamp_min(1e-8)
    is_weight = ratio.clamp(max=cfg.is_truncation)
    baseline = (old_probs * logged.rm_rewards).sum(dim=-1)
    return LoggedWeights(logged.rows, torch.where(logged.rows, is_weight, torch.zeros_like(is_weight)), baseline)


@torch.no_grad()
def score_minibatches(net, x, parts, mine, rewards, ranks):
    """Log-probabilities of net on every row (shaped like rewards), each minibatch scored together in the
    mode it trains in (None for no net); each process scores its block, and the sum over processes is the
    whole batch."""
    if net is None:
        return None
    out = torch.zeros_like(rewards)
    for mb, rows in zip(parts, mine):
        net.train(len(mb) > 1)
        out[rows] = F.log_softmax(net(x[rows]).to(rewards.dtype), dim=-1)
    return ranks.all_reduce(out)


def minibatches(n, cfg, generator, ranks, device):
    """(row indices of each of cfg.num_minibatches shuffled minibatches of n rows, the block of each that this
    process computes, on device): drawn once per update."""
    mb_size = max(1, -(-n // max(1, cfg.num_minibatches)))
    parts = torch.randperm(n, generator=generator).split(mb_size)
    mine = []
    for mb in parts:
        start, stop = ranks.block(len(mb))
        mine.append(mb[start:stop].to(device))
    return parts, mine


def ppo_update(policy, optimizer, x, rewards, cfg, reference=None, generator=None, ranks=None, logged=None):
    """Score the batch with the current policy (the old policy) and the reference, then run
    `cfg.passes()` passes over shuffled minibatches; returns the mean statistics.

    The minibatch split is drawn once per update and only the order of minibatches is shuffled each pass,
    so that a BatchNorm policy in train mode (statistics of the minibatch) sees each image with the same
    companions as when it was scored: the first ratio is exactly 1. The reference is scored the same way
    (its BatchNorm must not track statistics: momentum 0), so KL to it is 0 while the policy equals it.
    A minibatch of one image runs in eval mode (one image has no batch statistics). With `ranks`, every
    process passes the same x, rewards and generator state and computes only its block of each minibatch.
    logged: LoggedActions, rows learnt from a verdict.
    """
    ranks = ranks or Ranks()
    parts, mine = minibatches(x.shape[0], cfg, generator, ranks, x.device)
    old_logprobs, ref_logprobs = (score_minibatches(net, x, parts, mine, rewards, ranks)
                                  for net in (policy, reference))
    actions = torch.multinomial(old_logprobs.exp().cpu(), 1, generator=generator).squeeze(1).to(x.device)
    weights = None
    if logged is not None:
        weights = logged_weights(logged, old_logprobs, cfg)
        actions = torch.where(logged.rows, logged.action, actions)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    totals, count, epochs_run = {}, 0, 0
    for _ in range(cfg.passes()):
        for j in torch.randperm(len(parts), generator=generator).tolist():
            rows = mine[j]
            policy.train(len(parts[j]) > 1)
            loss, stats = ppo_loss(policy(x[rows]).to(rewards.dtype), old_logprobs[rows], rewards[rows],
                                   actions[rows], cfg, None if ref_logprobs is None else ref_logprobs[rows],
                                   denominator=len(parts[j]) / ranks.world,
                                   logged=None if weights is None else weights[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
        epochs_run += 1
        if cfg.target_kl is not None and ranks.sum_floats([stats["approx_kl"]])[0] / ranks.world > cfg.target_kl:
            break
    policy.eval()
    if reference is not None:
        reference.eval()
    names = sorted(totals)
    out = {k: v / count / ranks.world for k, v in zip(names, ranks.sum_floats(totals[k] for k in names))}
    out["update_epochs_run"] = epochs_run
    return out


def original_design_loss(new_probs, old_probs, rewards, clip_coef=0.2):
    """The first version's update, kept as a baseline: -min(ratio * r, clip(ratio) * r) on the sampled
    class, with the ratio of probabilities (not log-probs), no baseline, no entropy and no KL.

    new_probs, old_probs: (N,) probabilities of the sampled classes; rewards: (N,) +1/-1.
    """
    ratio = new_probs / old_probs
    return -torch.min(ratio * rewards, torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * rewards).mean()
