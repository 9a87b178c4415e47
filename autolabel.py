"""Auto-labels with a stated error bound: `--export FILE --autolabel MAX_ERROR` adds a row of kind `auto` for each
unanswered image the served model is sure enough of, at a threshold chosen so that, with 95% confidence, at most
MAX_ERROR of those rows are wrong.

    python train_rlhf.py --out runs/demo --export labels.csv --autolabel 0.02
    cal = choose_threshold(confidences, correct, 0.02)   # learn-then-test over thresholds, Clopper-Pearson
    clopper_pearson_upper(0, 59)                          # 0.0495: 59 error-free answers certify 5%

Calibration is cross-fitted over all the person's answers: the answered images are split in five folds (an
image's verdicts stay in its fold), five fresh reward models are fitted, each on four folds, and each scores the
fold it did not see. A held-back slice would cost the served model answers, and a slice of a few hundred answers
can rarely certify a small error (59 error-free answers is the least that certifies 5%). The threshold is then
applied to the served policy's confidence on the unanswered images. The assumption: the policy, trained on every
answer, is no less right at a given confidence than the reward models fitted on four fifths of them (the optimum
update fits the policy to the reward model, so its confidence follows the reward model's); bench/autolabel.py
checks the true error.

An answered image counts as right when the fit's top class is the image's label (a label, a correction, a yes,
or the class left when every other was rejected); a rejected top class, another label, and (with --ask verdict)
an image whose top class was neither confirmed nor rejected all count as wrong, which can only raise the bound.
"""
import json
import math
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone

from answer_ledger import SKIP, AnswerLedger
from checkpoint import CHECKPOINT_NAME, load_checkpoint
from crossfit_trust import MIN_HALF, CrossfitHalf, fit_half, folds_by_image, ledger_rows, predict
from dataset import IMAGENET_MEAN, IMAGENET_STD, ImagePool
from ddp import pick_device
from decoded_cache import EMPTY
from feature_cache import FeatureCache, weights_digest
from feedback_store import FeedbackStore
from learner import Learner
from run_config import ConfigError, RunConfig
from run_folder import REFERENCE_NAME
from user_errors import UserError

CONFIDENCE = 0.95  # of the stated bound: at most MAX_ERROR wrong, with this probability
PASSES = 3  # the fewest passes each fit takes over its training folds (crossfit_trust.fit_half)
FOLDS = 5  # each answer is scored by a fit on the other four fifths: close to the served model, never its own
GRID = 25  # thresholds tested below the start: one per 1/GRID of the calibration rows
CHUNK = 256  # unanswered images scored at a time: memory holds no more decoded images than that


class AutolabelError(UserError):
    """A run that cannot be auto-labelled (no checkpoint yet, an unreadable config); the message names the fix."""


# --- the bound (torch-free) ----------------------------------------------------------------------
def binomial_cdf(k, n, p):
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for the n of a calibration set)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq, top = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return min(1.0, math.fsum(math.exp(top - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
                              for i in range(min(k, n) + 1)))


def clopper_pearson_upper(errors, n, confidence=CONFIDENCE):
    """The exact one-sided upper bound on an error rate after `errors` wrong of n: the p at which seeing at
    most that many errors has probability 1 - confidence (1.0 for n = 0)."""
    if n <= 0 or errors >= n:
        return 1.0
    alpha = 1.0 - confidence
    if errors == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = errors / n, 1.0  # the CDF falls as p grows: bisect where it crosses alpha
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(errors, n, mid) > alpha else (lo, mid)
    return hi


def bound_holds(errors, n, max_error, confidence=CONFIDENCE):
    """clopper_pearson_upper(errors, n) <= max_error, by one CDF evaluation instead of a bisection."""
    return n > 0 and errors < n and binomial_cdf(errors, n, max_error) <= 1.0 - confidence


def answers_needed(max_error, confidence=CONFIDENCE):
    """The fewest error-free answers whose bound is at most max_error (None when no number is enough)."""
    if max_error <= 0.0:
        return None
    if max_error >= 1.0:
        return 1
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log1p(-max_error)))
    while n > 1 and bound_holds(0, n - 1, max_error, confidence):  # float rounding of the closed form
        n -= 1
    while not bound_holds(0, n, max_error, confidence):
        n += 1
    return n


def more_needed(errors, n, max_error, confidence=CONFIDENCE):
    """How many more error-free answers would bring `errors` wrong of n within max_error (None: no number)."""
    if max_error <= 0.0:
        return None
    k = 0
    step = answers_needed(max_error, confidence)
    while not bound_holds(errors, n + k, max_error, confidence):  # grow, then halve back: few CDF calls
        k += step
    lo = max(0, k - step)
    while lo < k:
        mid = (lo + k) // 2
        lo, k = (lo, mid) if bound_holds(errors, n + mid, max_error, confidence) else (mid + 1, k)
    return k


@dataclass
class Calibration:
    """The threshold chosen on the calibration answers (None: none passed), how many answers there were, how many
    lie at or above it and how many of those are wrong, the bound there, and the best bound any threshold had."""
    threshold: float | None
    calibrated: int
    above: int = 0
    errors: int = 0
    bound: float = 1.0
    best_bound: float = 1.0
    first_tested: tuple = (0, 0)  # (rows, errors) at the first threshold tested: what more answers must fix


def start_rows(calibrated, max_error, confidence=CONFIDENCE):
    """Where the sequence starts: the most rows, within half the calibration, that pass with as many errors as
    such a count allows (at least the error-free fewest). A start with room for a stray error or two is not lost
    to one slip among the most confident answers; it reads the count alone, so the 95% holds."""
    least = answers_needed(max_error, confidence)
    if least is None:
        return None
    rows, errors = least, 0
    while True:
        more = more_needed(errors + 1, 0, max_error, confidence)  # the fewest rows that pass with one error more
        if more > calibrated / 2:
            return rows
        rows, errors = more, errors + 1


def choose_threshold(confidences, correct, max_error, confidence=CONFIDENCE):
    """Fixed-sequence testing (learn-then-test): thresholds from the most confident calibration rows down, on a
    grid fixed by the count alone (start_rows, then every 1/GRID of the rows, then all); at each, the
    Clopper-Pearson bound of the errors among the rows at or above it; the lowest threshold reached before the
    first bound over max_error. The grid never reads which rows are right, so the 95% holds."""
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    cal = Calibration(None, len(order), best_bound=best_bound(confidences, correct, order, confidence))
    start = start_rows(len(order), max_error, confidence) or len(order) + 1
    step = max(1, math.ceil(len(order) / GRID))
    errors, target = 0, start
    for rank, i in enumerate(order):
        errors += not correct[i]
        n = rank + 1
        if n < len(order) and (n < target or confidences[order[n]] == confidences[i]):
            continue  # not a grid point (the last row always is), or not the last row of a tie
        if n < start:
            break  # fewer rows than the start in all: nothing is tested
        target = n + step
        if cal.threshold is None and cal.first_tested == (0, 0):
            cal.first_tested = (n, errors)
        if not bound_holds(errors, n, max_error, confidence):
            break
        cal.threshold, cal.above, cal.errors = float(confidences[i]), n, errors
    if cal.threshold is not None:
        cal.bound = clopper_pearson_upper(cal.errors, cal.above, confidence)
    return cal


def best_bound(confidences, correct, order, confidence=CONFIDENCE):
    """The lowest bound of any threshold (what the line reports when none passes): for each count of errors, the
    bound falls as rows are added, so only the last threshold before each new error needs a bisection."""
    best, errors = 1.0, 0
    for rank, i in enumerate(order):
        last_of_tie = rank + 1 == len(order) or confidences[order[rank + 1]] != confidences[i]
        next_wrong = rank + 1 == len(order) or not correct[order[rank + 1]]
        errors += not correct[i]
        if last_of_tie and next_wrong:
            best = min(best, clopper_pearson_upper(errors, rank + 1, confidence))
    return best


# --- the run, read without changing it ----------------------------------------------------------
@dataclass
class ServedRun:
    """What auto-labelling reads of a run folder: its config, pool, answers (by content hash) and models."""
    cfg: RunConfig
    ds: ImagePool
    ledger: AnswerLedger
    learner: Learner
    index_of: dict  # content hash -> pool position (the first file with that content)
    run_dir: str
    features: object = None  # the run's FeatureCache with frozen layers, read and never saved

    def inputs(self, indices):
        """The learner's inputs for pool positions; the decoded images are dropped after use."""
        indices = list(indices)
        out = self.features.batch(self.ds, indices) if self.features else self.learner.encode(self.ds.batch(indices))
        forget_decoded(self.ds)
        return out


def forget_decoded(ds):
    """Empty an in-memory pool's decoded images: it keeps every one, and an export reads each image once."""
    for i in ds.decoded.memory:
        ds.decoded.state[i] = EMPTY
    ds.decoded.memory.clear()


def open_served_run(run_dir):
    """The ServedRun of run_dir: config.json, checkpoint.pt (and reference.pt), feedback.sqlite read-only, and
    the pool scanned with no cache in the run folder (an export writes nothing there)."""
    cfg = read_config(run_dir)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.isfile(ckpt_path):
        raise AutolabelError(f"--autolabel: {run_dir} has no {CHECKPOINT_NAME} yet: train the run first "
                             f"(python train_rlhf.py --out {run_dir} --resume), or drop --autolabel")
    ckpt = load_checkpoint(ckpt_path)
    names, norm = list(ckpt["class_names"]), ckpt.get("normalization") or {}
    store = FeedbackStore(os.path.join(run_dir, "feedback.sqlite"), read_only=True)
    try:
        ledger = AnswerLedger.from_store(store.rows(), store.verdicts(), len(names), store.rechecks())
    finally:
        store.close()
    learner = Learner(len(names), None, cfg.finetune, cfg.ppo, cfg.rm, pick_device(cfg.device), cfg.seed)
    learner.load_state_dict(ckpt)
    reference = os.path.join(run_dir, REFERENCE_NAME)
    if os.path.isfile(reference):  # the calibration fits start where the run's reward model started
        learner.reference.load_state_dict(load_checkpoint(reference)["policy"])
    ds = ImagePool(cfg.images, cfg.image_size, names, norm.get("mean", IMAGENET_MEAN), norm.get("std", IMAGENET_STD))
    index_of = {}
    for i, h in enumerate(ds.all_hashes()):
        if h is not None:
            index_of.setdefault(h, i)
    features = None
    if cfg.finetune != "all":  # the run's cached features, when its frozen layers are these
        features = FeatureCache(run_dir, learner.encode,
                                f"{cfg.finetune}-{cfg.image_size}-{weights_digest(learner.encoder)}")
    return ServedRun(cfg, ds, ledger, learner, index_of, run_dir, features)


def read_config(run_dir):
    """The RunConfig of a run's config.json; AutolabelError naming the file when it cannot be read."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return RunConfig.from_flat(json.load(f), path)
    except (OSError, ValueError, TypeError, ConfigError) as err:
        raise AutolabelError(f"--autolabel: cannot read the run's settings from {path} ({err}): put back the "
                             "run's config.json, or drop --autolabel") from None


# --- calibration: cross-fitted answers ------------------------------------------------------------
def training_rows(run):
    """What the run's reward model trained on (crossfit_trust.ledger_rows), of the files still in the pool."""
    return [r for r in ledger_rows(run.ledger) if r[0] in run.index_of]  # a file gone from the pool has no input


def calibration_pairs(run, rows):
    """(confidence, correct) per answered image of rows, each scored by the fit that did not see it (FOLDS folds,
    split by image); [] when the rows are too few to fit."""
    if len({r[0] for r in rows}) < 2 * MIN_HALF:
        return []
    folds = folds_by_image(rows, random.Random(f"{run.cfg.seed}:autolabel"), FOLDS)

    def inputs(hashes):  # the ledger is keyed by content hash
        return run.inputs([run.index_of[h] for h in hashes])

    passes, pairs = fold_passes(run, folds), []
    for j, held in enumerate(folds):
        train = CrossfitHalf.of_rows(inputs, [r for i, fold in enumerate(folds) if i != j for r in fold])
        net = fit_half(run.learner, train, passes, run.cfg.seed + j)
        images = sorted({r[0] for r in held})
        for image, q in zip(images, predict(net, inputs(images).to(run.learner.device))):
            pairs.append((float(q.max()), int(q.argmax()) == run.ledger.label_of.get(image)))
    return pairs


def fold_passes(run, folds):
    """Passes that give each fit as many steps as the run's reward model took (rm_steps per update that fitted
    it): a fit much shorter than the served model's would be calibrated at confidences it never has."""
    rm = run.cfg.rm
    steps = rm.rm_steps * reward_model_fits(run.run_dir)
    biggest = max(sum(len(f) for f in folds) - len(fold) for fold in folds)
    return max(PASSES, steps * rm.rm_batch_size / max(1, biggest))


def reward_model_fits(run_dir):
    """Updates that fitted the reward model, as metrics.jsonl records them (0 when it cannot be read)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            return sum('"rm_loss"' in line for line in f)
    except OSError:
        return 0


# --- the auto rows --------------------------------------------------------------------------------
@dataclass
class AutoLabels:
    """The auto rows of an export and what the line about them says."""
    max_error: float
    unanswered: int
    answers: int  # answered images (the calibration scores them all when both halves can be fitted)
    calibration: Calibration
    rows: list = field(default_factory=list)

    def head(self):
        """What the export adds: '6210 auto labels of 9000 unanswered images (probability >= 0.931)'."""
        return (f"{len(self.rows)} auto labels of {self.unanswered} unanswered images (probability >= "
                f"{self.calibration.threshold:.3f})")

    def tail(self):
        """The bound and the answers it rests on; without a threshold, why none and what would allow one."""
        cal = self.calibration
        if cal.threshold is None:
            return f"no auto labels: {self.why_none()}"
        return (f"at most {percent(self.max_error)} of the auto rows wrong with {percent(CONFIDENCE)} confidence "
                f"(Clopper-Pearson bound {cal.bound:.3f}: {cal.errors} wrong of {cal.above} cross-fitted answers "
                f"above the threshold, {self.answers} answers in all)")

    def why_none(self):
        cal, pct, needed = self.calibration, percent(self.max_error), answers_needed(self.max_error)
        if needed is None:
            return f"no number of answers certifies {pct} wrong: pass an --autolabel above 0"
        more = more_needed(cal.first_tested[1], cal.first_tested[0], self.max_error)
        if cal.first_tested == (0, 0):  # no threshold had rows enough to be tested
            more = max(more, 2 * MIN_HALF) - self.answers  # and the folds need rows to be fitted at all
        why = (f"the best bound is {cal.best_bound:.3f}" if cal.calibrated
               else f"{needed} error-free answers are the fewest that can certify it")
        return (f"{self.answers} answers allow no threshold at {pct} ({why}); about {max(1, more)} more answers, "
                "none wrong above the threshold, would allow some")


def percent(x):
    return f"{x * 100:.4g}%"


def auto_labels(run_dir, max_error):
    """The AutoLabels of the run in run_dir at MAX_ERROR max_error; the run is read, never changed."""
    run = open_served_run(run_dir)
    try:
        rows = training_rows(run)
        answers = len({r[0] for r in rows})
        # fewer answers than an error-free threshold needs: no fit could change the outcome
        enough = answers >= (answers_needed(max_error) or answers + 1)
        pairs = calibration_pairs(run, rows) if enough else []
        cal = choose_threshold([c for c, _ in pairs], [ok for _, ok in pairs], max_error)
        unanswered = unanswered_images(run)
        out = AutoLabels(max_error, len(unanswered), answers, cal)
        if cal.threshold is not None:
            out.rows = served_rows(run, unanswered, cal.threshold)
            out.unanswered = len([i for i in unanswered if i not in run.ds.unreadable])  # found on decoding
        return out
    finally:
        run.ds.close()


def unanswered_images(run):
    """Pool positions of the images with no label (skipped ones included), one per content, readable so far."""
    labelled = {h for h, c in run.ledger.label_of.items() if c is not SKIP}
    return [i for h, i in sorted(run.index_of.items(), key=lambda kv: kv[1])
            if h not in labelled and i not in run.ds.unreadable]


def served_rows(run, indices, threshold):
    """An auto row for each image whose served-policy probability reaches threshold (never a class the person
    rejected for it), as export rows with their probability."""
    names, now = run.ds.class_names, datetime.now(timezone.utc)
    rows = []
    for start in range(0, len(indices), CHUNK):
        chunk = indices[start:start + CHUNK]
        probs = run.learner.served_probs(run.inputs(chunk))
        for i, q in zip(chunk, probs):
            top, p, sha1 = int(q.argmax()), float(q.max()), run.ds.hashes[i]
            if p >= threshold and i not in run.ds.unreadable and top not in run.ledger.rejected(sha1):
                rows.append({"source": run.ds.paths[i], "sha1": sha1, "class": names[top], "kind": "auto",
                             "rejected": "", "policy_version": run.learner.version, "created": now.timestamp(),
                             "time": now.isoformat(timespec="seconds"), "probability": p})
    return rows
