"""The learning side of RLHF: policy and reward model, their optimisers, and one update step.

Driven by the RLHF loop (rlhf_run.py), for the headless labeler and the labeling window alike.
The update functions take everything they need as arguments, so they run unchanged in N processes.

Inputs: with --finetune layer4 or head, the frozen layers of the policy, the reward model and the reference
are identical (the reward model starts from the policy's backbone), so every method here takes *inputs*:
the frozen layers' output (`Learner.encode`, cached per image by feature_cache.py) rather than pixels.
With --finetune all, inputs are the normalised images themselves.

Under torchrun (`ranks`), every process runs the same Learner on the same batches: forwards without
gradients compute a block of the rows each (`Ranks.map_rows`), gradient steps compute a block of each
minibatch with the policy and reward model in DistributedDataParallel, and BatchNorm takes the statistics
of the whole minibatch across processes (global_batchnorm.GlobalBatchNorm2d), so every process holds the same models.

BatchNorm: the trainable layers train in train mode (statistics of each minibatch), and ppo_update scores
the old policy and the KL reference on the very same minibatches in the same mode, so the first PPO ratio
is exactly 1 and the first KL to the reference 0. A minibatch of one image runs in eval mode: one image
has no batch statistics at small spatial sizes.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ddp import Ranks, wrap_ddp
from global_batchnorm import use_global_batchnorm
from models import PolicyModel, RewardModel, frozen_part, set_finetune, trainable_part
from optimum_fit import confidence, optimum_targets, optimum_update, reward_model_log_rewards
from policy_average import PolicyAverage
from ppo import LoggedActions, ppo_update
from run_config import PPOConfig, RewardModelConfig
from verdict_posterior import (
    DEFAULT_FLIP_RATE,
    clamp_flip_rate,
    estimate_flip_rate,
    log_likelihood_ratio,
    snips_accuracy,
    unslip,
)

FLIP_SCORES = 4000  # newest (q, verdict) pairs the flip-rate estimate reads

RELIABILITY_Z = 2.0  # standard errors below the measured accuracy at which the reward model is trusted


@dataclass
class VerdictBatch:
    """Verdicts "no" for one update: the new ones (inputs, classes rejected, the probability the proposing rule
    gave each) and those replayed to the reward model (inputs, classes rejected)."""
    x: torch.Tensor
    proposed: torch.Tensor
    behaviour: torch.Tensor
    x_replay: torch.Tensor
    proposed_replay: torch.Tensor
    evidence: Optional[torch.Tensor] = None  # (N, K) yes minus no per class of each new row's image



@dataclass
class UpdateBatch:
    """What one update learns from: the new answers (`fresh`: those the reward model has never been fitted on,
    default all; only they measure it), answers replayed to the reward model, unanswered images that learn from
    its rewards, and verdicts "no"."""
    x_new: torch.Tensor
    answers_new: torch.Tensor
    fresh: Optional[torch.Tensor] = None
    x_replay: Optional[torch.Tensor] = None
    answers_replay: Optional[torch.Tensor] = None
    x_unanswered: Optional[torch.Tensor] = None
    no: Optional[VerdictBatch] = None
    yes_new: Optional[torch.Tensor] = None      # (N,) bool: new answers that are a yes (evidence, not a label)
    evidence_new: Optional[torch.Tensor] = None  # (N, K) yes minus no per class of those images
    yes_replay: Optional[torch.Tensor] = None   # (M,) bool: replayed answers that are a yes
    evidence_replay: Optional[torch.Tensor] = None  # (M, K) yes minus no per class of those images
    policy_probs_new: Optional[torch.Tensor] = None  # (N, K) the policy's probabilities of the new answers' images,
    rm_rewards_new: Optional[torch.Tensor] = None    # and the reward model's rewards, when already known
    images: Optional[dict] = None  # pool images of the rows of x_new, x_replay, x_unanswered and no.x, by those names
    prior_unanswered: Optional[torch.Tensor] = None  # (U, K) what look-alike answered images say of those rows


def times_prior(q, prior):
    """Class probabilities q (N, K) times a prior (N, K) from independent evidence, normalised; q without one."""
    if prior is None:
        return q
    q = q * prior.to(q.dtype)
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)


def one_hot_rewards(answers, num_classes):
    """The +1/-1 rule for every class at once: +1 for the person's answer, -1 for every other class."""
    return 2.0 * F.one_hot(answers, num_classes).float() - 1.0


def wilson_lower_bound(hits, n, z=RELIABILITY_Z):
    """Lower end of the Wilson score interval for a success rate of hits/n (z standard errors)."""
    if n == 0:
        return 0.0
    p, z2 = hits / n, z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - margin) / (1 + z2 / n)


def reliability(record, num_classes, min_count):
    """How far to trust a predictor from (hit, answer) pairs on answers it had not seen: 0 at chance, 1 when
    always right. Its accuracy is taken at the Wilson lower bound (z = 2), and chance is the rate of always
    answering the commonest class of those answers (1 / classes where the answers are unknown), so a coin,
    or a predictor that learnt only the class balance, earns no trust."""
    n = len(record)
    if n < max(1, min_count):
        return 0.0
    lower = wilson_lower_bound(sum(h for h, _ in record), n)
    known = [a for _, a in record if a >= 0]
    chance = max(known.count(c) for c in set(known)) / len(known) if known else 1.0 / num_classes
    if chance >= 1.0:
        return 0.0  # every answer the same class: nothing tells a predictor from a constant
    return max(0.0, min(1.0, (lower - chance) / (1.0 - chance)))


def snips_reliability(record, num_classes, min_count, eps):
    """How far to trust the reward model from verdicts on proposals of its top class ((yes, 1 / behaviour)
    pairs, see verdict_posterior.snips_accuracy): its accuracy at the Wilson lower bound of the effective
    sample, undone of slips, against chance 1 / K."""
    if len(record) < max(1, min_count):
        return 0.0
    total = sum(w for _, w in record)
    yes_rate, n_eff = snips_accuracy(record)
    accuracy = unslip(wilson_lower_bound(yes_rate * n_eff, n_eff), eps) if total > 0 else 0.0
    chance = 1.0 / num_classes
    return max(0.0, min(1.0, (accuracy - chance) / (1.0 - chance)))


def set_train_mode(model, batch_size):
    """Train mode for BatchNorm statistics, except for batches of one."""
    model.train(batch_size >= 2)


def adam(params, lr, device="cpu"):
    """Adam with its fused kernel where the device has one: the optimiser step is a large share of a small-image
    update on CPU (bench/update_time.py). The same algorithm, summed in another order."""
    return torch.optim.Adam(params, lr=lr, fused=torch.device(device).type in ("cpu", "cuda"))


def reward_model_loss(logits, classes, rejected, verdict=None, eps=0.0):
    """Per-row loss of the reward model, read as P(yes | image, class) = its softmax p of that class: a label
    or a yes is -log p(class) (cross-entropy), a no is -log(1 - p(class)) (the Bernoulli likelihood). Verdict
    rows (yes and no) with a flip rate eps > 0 take the likelihood of a person who slips with rate eps:
    -log((1 - eps) p + eps (1 - p)) for a yes, -log(eps p + (1 - eps)(1 - p)) for a no, bounded by -log eps."""
    logp = F.log_softmax(logits, dim=-1).gather(1, classes[:, None]).squeeze(1)
    p = logp.exp()
    no = -torch.log1p(-p.clamp(max=1.0 - 1e-6))
    loss = torch.where(rejected, no, -logp)
    if verdict is None or eps <= 0:
        return loss
    said = torch.where(rejected, 1.0 - p, p)
    bounded = -torch.log((1.0 - eps) * said + eps * (1.0 - said))
    return torch.where(verdict, bounded, loss)


def reward_model_update(reward_model, optimizer, x, answers, steps, batch_size, generator, ranks=None, rejected=None,
                        verdict=None, eps=0.0):
    """`steps` steps on the reward model; x, answers: every answered image to draw from (rejected: (N,) bool,
    rows whose class the person said no to; verdict: rows from a yes or a no, read with flip rate eps).

    The first minibatch always starts with the first rows (the caller puts the newest answers there).
    With `ranks`, each process computes its block of every minibatch. Returns the mean loss.
    """
    ranks = ranks or Ranks()
    n = x.shape[0]
    rejected = torch.zeros(n, dtype=torch.bool) if rejected is None else rejected
    verdict = rejected if verdict is None else verdict | rejected
    losses = []
    for step in range(steps):
        if step == 0:
            idx = torch.arange(min(n, batch_size))
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        set_train_mode(reward_model, idx.numel())
        start, stop = ranks.block(idx.numel())
        rows = idx[start:stop].to(x.device)
        per_row = reward_model_loss(reward_model(x[rows]), answers[rows], rejected[rows.cpu()].to(x.device),
                                    verdict[rows.cpu()].to(x.device), eps)
        loss = per_row.sum() / (idx.numel() / ranks.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    reward_model.eval()
    return sum(ranks.sum_floats(losses)) / ranks.world / max(1, len(losses))


class Learner:
    """Policy, reward model, frozen reference policy and their optimisers, on one device."""

    def __init__(self, num_classes, backbone_state=None, finetune="all", ppo_cfg=None, rm_cfg=None,
                 device="cpu", seed=0, ranks=None):
        self.num_classes = num_classes
        self.finetune = finetune
        self.ppo_cfg = ppo_cfg or PPOConfig()
        self.rm_cfg = rm_cfg or RewardModelConfig()
        self.device = torch.device(device)
        self.ranks = ranks or Ranks()
        torch.manual_seed(seed)
        self.policy = PolicyModel(num_classes, backbone_state).to(self.device).eval()
        self.reward_model = RewardModel(num_classes).to(self.device).eval()
        if self.ranks.active:
            use_global_batchnorm(self.policy), use_global_batchnorm(self.reward_model)
        backbone = {k: v for k, v in self.policy.state_dict().items() if not k.startswith("model.fc.")}
        self.reward_model.load_state_dict(backbone, strict=False)  # same start, so frozen layers are shared
        # the served model (--policy-ema)
        self.average = PolicyAverage(self.policy, self.ppo_cfg.policy_ema, self.ppo_cfg.policy_ema_debias)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        for m in self.reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0  # scored in train mode beside the policy, it must never track statistics
        self.policy_opt = adam(set_finetune(self.policy, finetune), self.ppo_cfg.learning_rate, self.device)
        self.rm_opt = adam(set_finetune(self.reward_model, finetune), self.rm_cfg.rm_learning_rate, self.device)
        self.encoder = frozen_part(self.policy, finetune).eval()
        self.policy_net = trainable_part(self.policy, finetune)
        self.rm_net = trainable_part(self.reward_model, finetune)
        self.reference_net = trainable_part(self.reference, finetune)
        self.policy_ddp = wrap_ddp(self.policy_net, self.ranks)
        self.rm_ddp = wrap_ddp(self.rm_net, self.ranks)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0  # policy updates so far: recorded with each answer
        self.changes = 0  # bumped after every change to either model: what score_cache.ScoreCache keys on
        self.rm_record = []  # (hit 1/0, answer) for each new answer the reward model predicted before fitting it
        self.verdict_record = []  # (yes 1/0, 1 / behaviour) for each fresh verdict on its top class
        self.flip_scores = []  # (its P(proposed), verdict, its trust then) per fresh verdict: the flip rate's data
        self.estimated_flip_rate = DEFAULT_FLIP_RATE
        self.reference_kept = {}  # pool image -> log pi_ref: the reference never changes

    @torch.no_grad()
    def encode(self, images):
        """Inputs of the trainable layers for a normalised image batch (identity with --finetune all)."""
        self.encoder.eval()
        return self.ranks.map_rows(lambda x: self.encoder(x.to(self.device)).cpu(), images)

    @torch.no_grad()
    def policy_probs(self, inputs):
        """Class probabilities of the current policy (eval mode) for a batch of inputs."""
        self.policy.eval()
        return self.ranks.map_rows(lambda x: torch.softmax(self.policy_net(x.to(self.device)).float(), dim=-1).cpu(),
                                   inputs)

    @torch.no_grad()
    def image_probs(self, images):
        """Class probabilities of the whole served model (the policy's average, eval mode) for normalised images,
        whatever --finetune."""
        served = self.average.served().eval()
        return self.ranks.map_rows(lambda x: torch.softmax(served(x.to(self.device)).float(), dim=-1).cpu(), images)

    @torch.no_grad()
    def served_probs(self, inputs):
        """Class probabilities of the served model (see `image_probs`) for a batch of inputs."""
        served = self.average.served().eval()
        net = trainable_part(served, self.finetune)
        return self.ranks.map_rows(lambda x: torch.softmax(net(x.to(self.device)).float(), dim=-1).cpu(), inputs)

    @torch.no_grad()
    def predicted_rewards(self, inputs):
        """The reward model's predicted human reward of every class, (N, K) in [-1, 1]."""
        self.reward_model.eval()
        return self.ranks.map_rows(
            lambda x: RewardModel.rewards_from_logits(self.rm_net(x.to(self.device)).float()).cpu(), inputs)

    def rm_reliability(self):
        """Weight of the reward model's rewards: its accuracy on the newest answers before it saw them,
        against chance (see `reliability`), or on the newest verdicts on its top class (`snips_reliability`)."""
        cfg = self.rm_cfg
        labels = reliability(self.rm_record[-cfg.rm_window:], self.num_classes, cfg.rm_min_answers)
        if not self.verdict_record:
            return labels
        verdicts = snips_reliability(self.verdict_record[-cfg.rm_window:], self.num_classes, cfg.rm_min_answers,
                                     self.flip_rate() if self.bounded_verdicts() else 0.0)
        return max(labels, verdicts)

    def bounded_verdicts(self):
        return self.rm_cfg.verdict_evidence == "posterior"

    def flip_rate(self):
        """The person's rate of slipped verdicts: --verdict-flip-rate, else estimated from the fresh verdicts."""
        if self.rm_cfg.verdict_flip_rate is not None:
            return clamp_flip_rate(self.rm_cfg.verdict_flip_rate)
        return self.estimated_flip_rate

    def fit_reward_model(self, x, answers, rejected=None, verdict=None):
        """rm_steps reward-model steps on inputs x with answers (the first rows first; rejected: rows the
        person said no to; verdict: rows from a yes or a no); returns the loss."""
        eps = self.flip_rate() if self.bounded_verdicts() else 0.0
        loss = reward_model_update(self.rm_ddp, self.rm_opt, x.to(self.device), answers.to(self.device),
                                   self.rm_cfg.rm_steps, self.rm_cfg.rm_batch_size, self.generator, self.ranks,
                                   rejected, verdict, eps)
        self.changes += 1
        return loss

    def score_reward_model(self, x_new, answers_new, fresh, rewards=None):
        """Record whether the reward model predicts the fresh new answers (before it is fitted on them; rewards:
        its reward vectors for them, when already known); returns their accuracy, or None when none is fresh."""
        rewards = self.predicted_rewards(x_new) if rewards is None else rewards
        self.new_answer_probs = ((rewards.float().cpu() + 1.0) / 2.0)  # read by --recheck: scored before the fit
        rm_pred = rewards.argmax(dim=1)
        hits = (rm_pred == answers_new.to(rm_pred.device))[fresh.to(rm_pred.device)].tolist()
        if not hits:
            return None
        return self.remember(hits, answers_new[fresh].tolist())

    def score_verdicts(self, x, proposed, verdicts, behaviour=None, rewards=None):
        """Score the reward model on fresh verdicts before it is fitted on them; returns the share of them it
        predicts (yes when its P(yes) = p(proposed) is at least 1/2), or None for none.

        Its reliability, though, is its top-1 accuracy. With --verdict-evidence posterior it is read from the
        verdicts on proposals of its top class, weighted by 1 / behaviour (`snips_reliability`), and each
        verdict with its p(proposed) goes to the flip-rate estimate. With hard, as labels would give it: a yes
        is a hit when its likeliest class is the proposed one, a no to its likeliest class a miss, other no's
        are not recorded. A yes/no score would have to beat the share of no's to earn any trust."""
        if not x.shape[0]:
            return None
        rewards = self.predicted_rewards(x) if rewards is None else rewards
        p = (rewards.gather(1, proposed[:, None]).squeeze(1) + 1.0) / 2.0
        said_yes, top = verdicts.bool(), rewards.argmax(1) == proposed
        settled = said_yes | top
        if self.bounded_verdicts() and behaviour is not None:
            # an untrusted model's disagreement with a verdict is its own error as often as the person's slip
            trust = self.rm_reliability()
            self.flip_scores = (self.flip_scores + [(q, y, trust) for q, y in
                                                    zip(p.tolist(), said_yes.long().tolist())])[-FLIP_SCORES:]
            self.estimated_flip_rate = estimate_flip_rate(self.flip_scores)
            weights = 1.0 / behaviour.double().clamp_min(1e-6)
            self.verdict_record = (self.verdict_record + [(int(y), float(w)) for y, w in
                                                          zip(said_yes[top].tolist(), weights[top].tolist())]
                                   )[-self.rm_cfg.rm_window:]
        elif settled.any():
            self.remember((top & said_yes)[settled].long().tolist(),
                          torch.where(said_yes, proposed, -1)[settled].tolist())
        return ((p >= 0.5) == said_yes).float().mean().item()

    def remember(self, hits, answers):
        """Add (hit, answer) pairs to the reliability record, keeping the newest rm_window; returns their
        accuracy."""
        self.rm_record = (self.rm_record + [(int(h), int(a)) for h, a in zip(hits, answers)])[-self.rm_cfg.rm_window:]
        return sum(hits) / len(hits)

    def update(self, batch):
        """Fit the reward model on the newest answers (plus replay), then one PPO step on the answered images with
        the person's rewards, on the unanswered ones with the reward model's, scaled by its reliability (an
        unreliable reward model would teach the policy its own bias), and on each verdict "no" on its logged
        class alone (see ppo.LoggedActions). batch: an UpdateBatch. Returns a dict of metrics."""
        stats = {}
        if batch.x_new.shape[0]:
            stats.update(self.score_new_answers(batch))
        no = batch.no
        if batch.x_new.shape[0] or (no is not None and no.x.shape[0]):
            stats["rm_loss"] = self.fit_reward_model(*reward_model_rows(batch))
        if self.ppo_cfg.policy_update == "optimum":
            x, targets, weights, extra = optimum_rows(self, batch)
            stats.update(extra)
            if x.shape[0]:
                stats.update(self.optimum_step(x, targets, weights))
            return stats
        x, rewards, logged, extra = ppo_rows(self, batch)
        stats.update(extra)
        if x.shape[0]:
            stats.update(self.ppo_step(x, rewards, logged))
        return stats

    def score_new_answers(self, batch):
        """The reward model's accuracy on the fresh new answers, before it is fitted on them, and the policy's
        agreement with all of them."""
        stats = {}
        fresh = torch.ones(len(batch.answers_new), dtype=torch.bool) if batch.fresh is None else batch.fresh
        acc = self.score_reward_model(batch.x_new, batch.answers_new, fresh, batch.rm_rewards_new)
        if acc is not None:
            stats["rm_acc"] = acc
        probs = self.policy_probs(batch.x_new) if batch.policy_probs_new is None else batch.policy_probs_new
        stats["agreement"] = (probs.argmax(1) == batch.answers_new).float().mean().item()
        return stats

    def replays_to_policy(self, batch):
        """Whether this update trains the policy on the batch's replayed answers too (--policy-replay)."""
        return self.ppo_cfg.policy_replay and batch.x_replay is not None and batch.x_replay.shape[0] > 0

    def answer_rewards(self, x, answers, yes=None, evidence=None):
        """r of answered rows for pi*: the +1/-1 rule over --optimum-beta (a label), or, read as evidence, the log
        of a yes's verdict posterior on the reward model's prior: pi* = pi_ref * posterior."""
        rewards = one_hot_rewards(answers, self.num_classes) / self.ppo_cfg.optimum_beta
        if yes is not None and yes.any() and self.bounded_verdicts():
            rewards[yes] = self.posterior_log_rewards(x[yes], evidence[yes])
        return rewards

    def no_rewards(self, x, proposed, evidence=None):
        """r of verdict-"no" rows for pi*: the log of their verdict posterior (read as evidence), else log q with
        the rejected class removed."""
        if self.bounded_verdicts() and evidence is not None:
            return self.posterior_log_rewards(x, evidence)
        return reward_model_log_rewards(self.rm_probs(x), proposed)

    def posterior_log_rewards(self, x, evidence):
        """r = log of each image's verdict posterior (the reward model's q times ((1 - eps) / eps) ** net),
        up to a constant per row, which pi* does not see."""
        llr = log_likelihood_ratio(self.flip_rate())
        return reward_model_log_rewards(self.rm_probs(x)) + llr * evidence.float()

    @torch.no_grad()
    def reference_logprobs(self, inputs, images=None):
        """log pi_ref of the reference policy (the run's start), eval mode, for a batch of inputs (images: their pool
        images, whose rows are then computed once a run)."""
        self.reference.eval()

        def forward(x):
            return torch.log_softmax(self.reference_net(x.to(self.device)).float(), dim=-1).cpu()
        if images is None or not len(images):
            return self.ranks.map_rows(forward, inputs)
        missing = [j for j, i in enumerate(images) if i not in self.reference_kept]
        if missing:
            self.reference_kept.update(zip([images[j] for j in missing], self.ranks.map_rows(forward, inputs[missing])))
        return torch.stack([self.reference_kept[i] for i in images])

    def rm_probs(self, inputs):
        """The reward model's class probabilities q (N, K): P(the person answers that class)."""
        return (self.predicted_rewards(inputs) + 1.0) / 2.0

    def optimum_step(self, x, targets, weights):
        """One --policy-update optimum fit of the policy to the targets; returns statistics."""
        stats = optimum_update(self.policy_ddp, self.policy_opt, x.to(self.device), targets.to(self.device),
                               weights.to(self.device), self.ppo_cfg, generator=self.generator, ranks=self.ranks)
        self.version += 1
        self.changes += 1
        self.average.update()
        return stats

    def ppo_step(self, x, rewards, logged=None):
        """One PPO update of the policy on inputs x with reward vectors (N, K) (logged: ppo.LoggedActions, rows
        learnt from a verdict); returns statistics."""
        stats = ppo_update(self.policy_ddp, self.policy_opt, x.to(self.device), rewards.to(self.device),
                           self.ppo_cfg, reference=self.reference_net, generator=self.generator, ranks=self.ranks,
                           logged=None if logged is None else logged.to(self.device))
        self.version += 1
        self.changes += 1
        self.average.update()
        return stats

    def has_batchnorm(self):
        """Whether the trainable layers hold BatchNorm statistics (not with --finetune head)."""
        return any(isinstance(m, torch.nn.BatchNorm2d) for m in self.policy_net.modules())

    @torch.no_grad()
    def recompute_batchnorm(self, batches):
        """The BatchNorm running statistics of the policy's, the served average's and the reward model's trainable
        layers recomputed over these input batches (torch.optim.swa_utils.update_bn): in eval mode the models then
        see the pool's statistics, not a momentum average of the last few minibatches."""
        batches = [b.to(self.device) for b in batches]
        nets = [self.policy_net, self.rm_net]
        if self.average.served() is not self.policy:
            nets.append(trainable_part(self.average.served(), self.finetune))
        for net in nets:
            torch.optim.swa_utils.update_bn(batches, net)
            net.eval()
        self.changes += 1

    def state_dict(self):
        """"policy" is the served model (--policy-ema's average); "policy_trained" the policy that learns, when it
        differs: inference, export and auto-labels read the first, a resumed run the second."""
        served = self.average.served()
        trained = {} if served is self.policy else {"policy_trained": self.policy.state_dict()}
        return {"policy": served.state_dict(), **trained, "policy_average": self.average.state_dict(),
                "reward_model": self.reward_model.state_dict(),
                "policy_opt": self.policy_opt.state_dict(),
                "reward_opt": self.rm_opt.state_dict(), "generator": self.generator.get_state(),
                "version": self.version, "rm_record": [list(r) for r in self.rm_record],
                "verdict_record": [list(r) for r in self.verdict_record],
                "flip_scores": [list(r) for r in self.flip_scores]}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state.get("policy_trained") or state["policy"])
        self.average.load(state["policy"], state.get("policy_average"))
        self.reward_model.load_state_dict(state["reward_model"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.rm_opt.load_state_dict(state["reward_opt"])
        self.changes += 1
        self.generator.set_state(state["generator"])
        self.version = int(state["version"])
        if "rm_record" in state:
            self.rm_record = [(int(h), int(a)) for h, a in state["rm_record"]]
        else:  # format 1 kept hits only: the answers' classes are unknown (-1)
            self.rm_record = [(int(h), -1) for h in state.get("rm_fresh", [])]
        self.verdict_record = [(int(y), float(w)) for y, w in state.get("verdict_record", [])]
        # before the trust was kept, each verdict counted in full
        self.flip_scores = [(float(r[0]), int(r[1]), float(r[2]) if len(r) > 2 else 1.0)
                            for r in state.get("flip_scores", [])]
        self.estimated_flip_rate = estimate_flip_rate(self.flip_scores) if self.flip_scores else DEFAULT_FLIP_RATE


def ppo_rows(learner, batch):
    """(inputs, reward vectors (N, K), LoggedActions or None, statistics) of one PPO step: the answers (new, and
    with --policy-replay those replayed to the reward model), the unanswered images with the reward model's
    rewards (when it is trusted), the verdicts "no"."""
    k, weight = learner.num_classes, learner.rm_reliability()
    xs, rewards = [batch.x_new], [one_hot_rewards(batch.answers_new, k)]
    stats = {"rm_weight": weight, "replay_images": 0}
    if learner.replays_to_policy(batch):
        xs.append(batch.x_replay)  # as in optimum_rows: the policy meets an answer as often as the reward model
        rewards.append(one_hot_rewards(batch.answers_replay, k))
        stats["replay_images"] = int(batch.x_replay.shape[0])
    unanswered = batch.x_unanswered
    use_rm = unanswered is not None and unanswered.shape[0] > 0 and weight > 0
    if use_rm:
        xs.append(unanswered)
        prior = batch.prior_unanswered
        rewards.append(weight * (learner.predicted_rewards(unanswered) if prior is None
                                 else 2.0 * times_prior(learner.rm_probs(unanswered), prior) - 1.0))
    stats["rm_images"] = int(unanswered.shape[0]) if use_rm else 0
    logged = None
    no = batch.no
    if no is not None and no.x.shape[0]:  # each "no" on its logged class: reward -1 there
        before = sum(len(r) for r in rewards)
        xs.append(no.x)
        rewards.append(-torch.ones(len(no.proposed), k))
        logged = LoggedActions(rows=torch.arange(before + len(no.proposed)) >= before,
                               action=torch.cat([torch.zeros(before, dtype=torch.long), no.proposed]),
                               behaviour=torch.cat([torch.ones(before), no.behaviour.float()]),
                               rm_rewards=torch.cat([torch.zeros(before, k), learner.predicted_rewards(no.x)]))
        stats["verdict_no_images"] = int(len(no.proposed))
    return torch.cat(xs), torch.cat(rewards), logged, stats


def optimum_rows(learner, batch):
    """(inputs, target distributions pi* (N, K), weights (N,), statistics) of a --policy-update optimum step: the
    new answers and verdicts "no", the answers replayed to the reward model (--policy-replay), and the unanswered
    images, each weighted by how sure the reward model is there (see optimum_fit.py). A replayed "no" is not
    fitted again: beside one class ruled out its target is the reward model's guess, which the unanswered
    images already teach, weighted by its confidence rather than in full."""
    no = batch.no

    def ones(x):
        return torch.ones(x.shape[0])

    images = batch.images or {}
    parts = [(batch.x_new, learner.answer_rewards(batch.x_new, batch.answers_new, batch.yes_new, batch.evidence_new),
              ones(batch.x_new), images.get("new"))]
    stats = {"rm_weight": learner.rm_reliability(), "rm_images": 0, "replay_images": 0}
    if learner.replays_to_policy(batch):  # an answer's target never goes stale
        parts.append((batch.x_replay, learner.answer_rewards(batch.x_replay, batch.answers_replay, batch.yes_replay,
                                                             batch.evidence_replay), ones(batch.x_replay),
                      images.get("replay")))
        stats["replay_images"] = int(batch.x_replay.shape[0])
    unanswered = batch.x_unanswered
    if unanswered is not None and unanswered.shape[0]:  # weighted by how sure it is there, not gated
        q = times_prior(learner.rm_probs(unanswered), batch.prior_unanswered)  # two independent guesses: their product
        parts.append((unanswered, reward_model_log_rewards(q), confidence(q), images.get("unanswered")))
        stats["rm_images"] = int(unanswered.shape[0])
    if no is not None and no.x.shape[0]:
        parts.append((no.x, learner.no_rewards(no.x, no.proposed, no.evidence), ones(no.x), images.get("no")))
        stats["verdict_no_images"] = int(len(no.proposed))
    x = torch.cat([p[0] for p in parts])
    keys = None if any(p[3] is None for p in parts) else [i for p in parts for i in p[3]]
    targets = optimum_targets(learner.reference_logprobs(x, keys), torch.cat([p[1] for p in parts]), 1.0)
    return x, targets, torch.cat([p[2] for p in parts]), stats


def reward_model_rows(batch):
    """(inputs, classes, rejected, verdict) the reward model fits in one update, newest first: the new answers,
    the new verdicts "no", the replayed answers, the replayed verdicts "no"; verdict marks a yes or a no."""
    no = batch.no
    empty_x, empty_a = batch.x_new[:0], batch.answers_new[:0]

    def yes(mask, n):
        return torch.zeros(n, dtype=torch.bool) if mask is None else mask.bool()

    parts = [(batch.x_new, batch.answers_new, False, yes(batch.yes_new, len(batch.answers_new))),
             (empty_x, empty_a, True, None) if no is None else (no.x, no.proposed, True, None)]
    if batch.x_replay is not None:
        parts.append((batch.x_replay, batch.answers_replay, False, yes(batch.yes_replay, len(batch.answers_replay))))
    parts.append((empty_x, empty_a, True, None) if no is None else (no.x_replay, no.proposed_replay, True, None))
    rejected = [torch.full((len(p[1]),), p[2], dtype=torch.bool) for p in parts]
    verdict = [r if p[3] is None else p[3] for p, r in zip(parts, rejected)]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(rejected),
            torch.cat(verdict))


@torch.no_grad()
def evaluate_accuracy(predict, x_batches, labels):
    """Accuracy of argmax predict(x) (class scores) on normalised image batches against labels; -1 labels
    are ignored. predict: e.g. Learner.image_probs, or an eval-mode policy."""
    correct = total = 0
    for x, y in zip(x_batches, labels):
        keep = y >= 0
        if not keep.any():
            continue
        pred = predict(x).argmax(dim=1).cpu()
        correct += (pred[keep] == y[keep]).sum().item()
        total += keep.sum().item()
    return correct / total if total else float("nan")
