"""The reward model measured again at an epoch end, by cross-fitting: two fresh reward models, each fitted on half
of the answers and verdicts, score the other half. A run whose budget was spent early (every verdict arrived
while the reward model was near chance) then still earns the trust its answers justify.

    labels, verdicts = crossfit_records(learner, halves, passes)   # the records rm_reliability reads
"""
import copy
import math
from dataclasses import dataclass

import torch

from answer_ledger import IMPLIED, SKIP, VERDICT_YES
from learner import adam, reward_model_update
from models import set_finetune, trainable_part

MIN_HALF = 16  # rows per half below which a fit says nothing worth recording


@dataclass
class CrossfitHalf:
    """One half of what the person said: inputs, classes (a label's, a yes's or a no's proposed class), whether
    each row is a no, a verdict at all, and the probability its proposal had (1 for labels)."""
    x: torch.Tensor
    classes: torch.Tensor
    rejected: torch.Tensor
    verdict: torch.Tensor
    behaviour: torch.Tensor


    @classmethod
    def of_rows(cls, inputs, rows):
        """The half of rows (image, class, rejected, verdict, behaviour); inputs(images): the learner's inputs."""
        return cls(inputs([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.long),
                   torch.tensor([r[2] for r in rows], dtype=torch.bool),
                   torch.tensor([r[3] for r in rows], dtype=torch.bool),
                   torch.tensor([r[4] for r in rows], dtype=torch.float64))


def ledger_rows(ledger):
    """What a reward model learns from a ledger, as rows (image, class, rejected, verdict, behaviour): each label
    the person gave (not one a yes or the last class left made) and every live verdict."""
    rows = [(image, label, False, False, 1.0) for image, label in ledger.label_of.items()
            if label is not SKIP and ledger.kind_of[image] not in (VERDICT_YES, IMPLIED)]
    return rows + [(v.image, v.proposed, not v.verdict, True, v.behaviour) for v in ledger.live_verdicts()]


def halves_by_image(rows, rng):
    """rows split in two by rng's shuffle of their images: an image's rows stay in one half, so no half sees
    what the other says of it."""
    return folds_by_image(rows, rng, 2)


def folds_by_image(rows, rng, k):
    """rows split in k folds by rng's shuffle of their images, an image's rows in one fold."""
    images = sorted({r[0] for r in rows})
    rng.shuffle(images)
    fold_of = {image: j for j in range(k) for image in images[j * len(images) // k: (j + 1) * len(images) // k]}
    return [[r for r in rows if fold_of[r[0]] == j] for j in range(k)]


def fresh_reward_model(learner, seed):
    """A reward model as the run's started: the reference policy's layers, a new seeded head."""
    model = copy.deepcopy(learner.reward_model)
    backbone = {k: v for k, v in learner.reference.state_dict().items() if not k.startswith("model.fc.")}
    model.load_state_dict(backbone, strict=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.fc.reset_parameters()
    params = set_finetune(model, learner.finetune)
    return trainable_part(model, learner.finetune), adam(params, learner.rm_cfg.rm_learning_rate, learner.device)


def fit_half(learner, train, passes, seed):
    """A fresh reward model fitted on `train` for `passes` passes (at least rm_steps steps), in eval mode."""
    net, opt = fresh_reward_model(learner, seed)
    cfg = learner.rm_cfg
    steps = max(cfg.rm_steps, math.ceil(passes * len(train.classes) / cfg.rm_batch_size))
    eps = learner.flip_rate() if learner.bounded_verdicts() else 0.0
    reward_model_update(net, opt, train.x.to(learner.device), train.classes.to(learner.device), steps,
                        cfg.rm_batch_size, torch.Generator().manual_seed(seed), None, train.rejected, train.verdict,
                        eps)
    return net.eval()


def predict(net, x, batch_size=64):
    """Class probabilities of a fitted half on inputs x, in batches."""
    with torch.no_grad():
        return torch.cat([net(x[s:s + batch_size]).softmax(1).cpu() for s in range(0, len(x), batch_size)]
                         or [torch.zeros(0)])


def fit_and_score(learner, train, test, passes, seed):
    """Fit a fresh reward model on `train`; (label hits (hit, answer), verdict record (yes, 1 / behaviour)) on
    `test`: its top class against each label, and each verdict on a proposal of its top class."""
    net = fit_half(learner, train, passes, seed)
    with torch.no_grad():
        top = net(test.x.to(learner.device)).argmax(1).cpu()
    on_top = top == test.classes
    labels = [(int(h), int(c)) for h, c in zip(on_top[~test.verdict].tolist(), test.classes[~test.verdict].tolist())]
    said_yes = test.verdict & ~test.rejected
    pick = test.verdict & on_top
    weights = (1.0 / test.behaviour.double().clamp_min(1e-6))[pick]
    verdicts = [(int(y), float(w)) for y, w in zip(said_yes[pick].tolist(), weights.tolist())]
    return labels, verdicts


def crossfit_probs(learner, halves, passes=3, seed=0):
    """Out-of-fold class probabilities: (probabilities of half a's rows from a fit on b, of b's from a fit on
    a), or None when a half is too small to fit. What the rows say is known to neither fit that scores them."""
    a, b = halves
    if min(len(a.classes), len(b.classes)) < MIN_HALF:
        return None
    on_a = predict(fit_half(learner, b, passes, seed + 1), a.x.to(learner.device))
    on_b = predict(fit_half(learner, a, passes, seed), b.x.to(learner.device))
    return on_a, on_b


def crossfit_records(learner, halves, passes=3, seed=0):
    """(label record, verdict record) of two half-data fits scoring each other's half, or None when a half is
    too small to fit."""
    a, b = halves
    if min(len(a.classes), len(b.classes)) < MIN_HALF:
        return None
    la, va = fit_and_score(learner, a, b, passes, seed)
    lb, vb = fit_and_score(learner, b, a, passes, seed + 1)
    return la + lb, va + vb
