"""Verdicts as evidence, not as labels: a per-image posterior over classes, the person's flip rate estimated from
the data, and an unbiased measure of the reward model from logged proposals. Torch-free.

A person who slips with rate eps says yes to class k with probability 1 - eps when k is the image's class and eps
when it is not; a no the other way round. So a yes multiplies k's odds by (1 - eps) / eps and a no divides them,
and however many verdicts an image has, its posterior is the prior times ((1 - eps) / eps) ** net, with net the
yes minus the no per class: one slip can never outweigh the rest, the way a hard label or a rejection does.

    net = net_verdicts(ledger, image)                 # yes - no per class
    posterior(prior, net, eps)                        # P(class | prior, verdicts)
    estimate_flip_rate([(q_k, verdict, trust), ...])  # MAP eps: q_k, the reward model's P(k) before the verdict
    snips_accuracy([(yes, 1 / behaviour), ...], eps)  # its top-1 accuracy from proposals of its top class
"""
import math

import numpy as np

# The estimate before a trusted reward model has seen the person slip. Low, because a high one costs a careful
# person most of what the first verdicts teach (a yes on a class the model finds unlikely is read as a slip),
# while a person who slips raises it as soon as the model is trusted.
DEFAULT_FLIP_RATE = 0.01
FLIP_RATE_RANGE = (0.005, 0.45)  # at 0 one verdict is certain again; at 1/2 a verdict says nothing
PRIOR_VERDICTS = 20.0  # pseudo-verdicts at DEFAULT_FLIP_RATE the estimate starts from: a few verdicts move it little


def clamp_flip_rate(eps):
    lo, hi = FLIP_RATE_RANGE
    return min(hi, max(lo, float(eps)))


def log_likelihood_ratio(eps):
    """How much one yes raises (one no lowers) its class's log-odds: log((1 - eps) / eps)."""
    eps = clamp_flip_rate(eps)
    return math.log((1.0 - eps) / eps)


def net_verdicts(verdicts, num_classes):
    """Yes minus no per class, from (proposed class, verdict 1/0) pairs."""
    net = [0] * num_classes
    for proposed, verdict in verdicts:
        net[proposed] += 1 if verdict else -1
    return net


def posterior(prior, net, eps):
    """P(class | verdicts): prior (K probabilities, any positive scale) times ((1 - eps) / eps) ** net, normalised."""
    llr = log_likelihood_ratio(eps)
    logits = [math.log(max(p, 1e-12)) + n * llr for p, n in zip(prior, net)]
    top = max(logits)
    w = [math.exp(v - top) for v in logits]
    total = sum(w)
    return [v / total for v in w]


def flip_probability(q, verdict, eps):
    """P(this verdict is a slip | the model's probability q of the proposed class, eps)."""
    if verdict:  # a yes is a slip when the class is not the image's
        slip, honest = (1.0 - q) * eps, q * (1.0 - eps)
    else:        # a no is a slip when it is
        slip, honest = q * eps, (1.0 - q) * (1.0 - eps)
    return slip / max(slip + honest, 1e-300)


def estimate_flip_rate(scored, prior_rate=DEFAULT_FLIP_RATE, prior_weight=PRIOR_VERDICTS, iterations=200):
    """MAP estimate of eps by EM from (q, verdict[, trust]) rows, q the reward model's probability of the proposed
    class before it was fitted on that verdict, trust (default 1) how far that model was trusted then, which is
    how much the row counts; a Beta prior of `prior_weight` pseudo-verdicts at `prior_rate`."""
    rows = np.asarray([tuple(r) + (1.0,) * (3 - len(r)) for r in scored], dtype=np.float64).reshape(-1, 3)
    q, yes, weight = rows[:, 0], rows[:, 1] > 0.5, rows[:, 2]
    right = np.where(yes, q, 1.0 - q)  # P(the verdict is honest | no slip) per row: the model's view
    eps = prior_rate
    for _ in range(iterations):
        slip = (1.0 - right) * eps
        slips = float((weight * slip / np.maximum(slip + right * (1.0 - eps), 1e-300)).sum())
        new = (slips + prior_weight * prior_rate) / (float(weight.sum()) + prior_weight)
        done = abs(new - eps) < 1e-7
        eps = new
        if done:
            break
    return clamp_flip_rate(eps)


def snips_accuracy(record, eps=0.0):
    """(accuracy, effective sample size) of a predictor's top class from verdicts on proposals of that class:
    record holds (yes 1/0, 1 / P(the proposing rule chose it)) pairs. Self-normalised importance sampling
    (Swaminathan & Joachims 2015), then the yes-rate undone of slips: a = (y - eps) / (1 - 2 eps)."""
    total = sum(w for _, w in record)
    if total <= 0:
        return 0.0, 0.0
    yes_rate = sum(y * w for y, w in record) / total
    n_eff = total * total / sum(w * w for _, w in record)
    return unslip(yes_rate, eps), n_eff


def unslip(yes_rate, eps):
    """The share of right proposals behind a yes-rate at flip rate eps, within [0, 1]."""
    eps = min(float(eps), 0.49)
    return min(1.0, max(0.0, (yes_rate - eps) / (1.0 - 2.0 * eps)))
