"""Rechecks (--recheck FRACTION, --ask label): the person's answers the models disagree with most, asked again.

Each answer is scored by a reward model that was not fitted on it: the run's own reward model just before its
first fit on the answer, and, each time the answers have doubled until a cross-fit has scored CROSSFIT_UNTIL of
them (in the window: always), two fresh reward models fitted on halves of them, each scoring the other half
(cross-fitting, as confident learning does). After every update the answers whose score gives their class the
least probability, among those whose scoring model's likeliest class is another, are asked again first, while
rechecks stay within FRACTION of the questions asked so far. The new
answer supersedes the old in the ledger (both stay in the store); an answer asked again is never asked a
third time.

    rechecks.note_fresh(images, fresh, labels, learner)  # the reward model's probabilities before it learnt them
    metrics = rechecks.plan(run)                 # after an update: queue the most suspect answers
    index = rechecks.hand_out(run)               # next_question asks these before unasked images
"""
import math
import random

from answer_ledger import SKIP
from autolabel import choose_threshold, more_needed
from crossfit_trust import MIN_HALF, CrossfitHalf, crossfit_probs

SHOWN_MAX_ERROR = 0.02  # the error bound of the window's estimate of what auto-labels could cover
COVERAGE_SAMPLE = 64   # unanswered images the estimate scores (the window only: a forward pass each)
GROWTH = 2.0           # cross-fit again once the person's answers are this many times those last cross-fitted
CROSSFIT_ANSWERS = 1024  # most answers one cross-fit fits and scores (a seeded sample beyond)
# No cross-fit once one has scored this many answers: every later answer is scored by the run's own reward
# model before it learns it, which has by then been fitted on more answers than either half was. The window
# goes on at each doubling: its auto-label estimate reads the newest cross-fit
CROSSFIT_UNTIL = 128
RECHECKABLE = ("label", "correction")  # kinds of answer a person gave by choosing a class


class Rechecks:
    """The rechecks of one run: the answers' scores, the ones queued to ask again and the ones handed out."""

    def __init__(self, fraction, seed, estimate=False):
        self.fraction, self.seed = fraction, seed
        self.estimate = estimate  # the window: also estimate how many unanswered images auto-labels could cover
        self.calibration = None   # (confidences, rights) of the last cross-fit: what --autolabel would read
        self.scores = {}       # image -> (probability of its answer, likeliest class) from a model not fitted on it
        self.due = []          # images to ask again, most suspect first
        self.handed = set()    # handed out as rechecks, no answer yet
        self.crossfit_at = 0   # answers the last cross-fit scored

    def note_fresh(self, images, fresh, labels, learner):
        """After an update: the reward model's class probabilities of its new answers (`images`, tensor `labels`),
        taken before its first fit on them (fresh: which it had never been fitted on)."""
        if not self.fraction or not images:
            return
        for image, new, label, p in zip(images, fresh, labels.tolist(), learner.new_answer_probs.tolist()):
            if new:
                self.scores.setdefault(image, (p[label], max(range(len(p)), key=p.__getitem__)))

    def room(self, ledger):
        """Rechecks that may still be queued: FRACTION of the questions asked so far, less those asked or queued."""
        return math.floor(self.fraction * ledger.given()) - ledger.recheck_total - len(self.due) - len(self.handed)

    def plan(self, run):
        """After an update: queue the most suspect answers that may be asked again; returns the metrics of the
        auto-label estimate (the window) or none."""
        ledger = run.ledger
        if self.fraction <= 0 and not self.estimate:
            return {}
        answered = [i for i, k in ledger.kind_of.items() if k in RECHECKABLE]
        grown = len(answered) >= max(2 * MIN_HALF, GROWTH * self.crossfit_at)
        if grown and (self.estimate or self.crossfit_at < CROSSFIT_UNTIL):
            self.crossfit(run, answered)
        if self.fraction > 0 and self.room(ledger) > 0:
            self.queue(run)
        return coverage_estimate(run, self.calibration) if self.estimate else {}

    def queue(self, run):
        ledger = run.ledger
        with run.lock:  # the window's guesser hands rechecks out meanwhile
            queued = self.handed | set(self.due)
            suspects = [(p, i) for i, (p, top) in self.scores.items()
                        if ledger.kind_of.get(i) in RECHECKABLE and i not in ledger.rechecks and i not in queued
                        and top != ledger.label_of[i]]
            self.due += [i for _, i in sorted(suspects)[:self.room(ledger)]]

    def crossfit(self, run, answered):
        """Score the answers by two half fits (each scores the half it did not see)."""
        rng = random.Random(f"{self.seed}:recheck:{len(answered)}")
        rows = sorted(answered) if len(answered) <= CROSSFIT_ANSWERS else sorted(rng.sample(answered, CROSSFIT_ANSWERS))
        rng.shuffle(rows)
        halves = rows[: len(rows) // 2], rows[len(rows) // 2:]
        labelled = [[(i, run.answer_of[i], False, False, 1.0) for i in h] for h in halves]
        probs = crossfit_probs(run.learner, [CrossfitHalf.of_rows(run.inputs, h) for h in labelled],
                               seed=self.seed + len(answered))
        if probs is None:
            return
        confidences, rights = [], []
        for images, p in zip(halves, probs):
            for image, row in zip(images, p.tolist()):
                top = max(range(len(row)), key=row.__getitem__)
                self.scores[image] = (row[run.answer_of[image]], top)
                confidences.append(row[top])
                rights.append(top == run.answer_of[image])
        self.calibration, self.crossfit_at = (confidences, rights), len(answered)

    def hand_out(self, run):
        """The next image to ask again (marked handed out), or None."""
        while self.due:
            index = self.due.pop(0)
            if run.answer_of.get(index, SKIP) is not SKIP and index not in run.ledger.rechecks:
                self.handed.add(index)
                run.questions.outstanding.add(index)
                return index
        return None

    def answered(self, index):
        """True (and no longer handed out) when image `index` was handed out as a recheck."""
        if index not in self.handed:
            return False
        self.handed.discard(index)
        return True

    def undone(self, run, index):
        """A recheck's answer taken back: the image is handed out again, as a recheck."""
        self.handed.add(index)
        run.questions.outstanding.add(index)


def coverage_estimate(run, calibration):
    """How many of the unanswered images auto-labels at SHOWN_MAX_ERROR could cover now: the threshold chosen on
    the last cross-fit's calibration, the share of a seeded sample of the unanswered the policy is that sure of."""
    if calibration is None:
        return {}
    unanswered = [i for i in range(len(run.ds)) if run.answer_of.get(i, SKIP) is SKIP and i not in run.ds.unreadable]
    cal = choose_threshold(*calibration, SHOWN_MAX_ERROR)
    out = {"autolabel_unanswered": len(unanswered), "autolabel_max_error": SHOWN_MAX_ERROR}
    if cal.threshold is None:
        return {**out, "autolabel_more_answers": more_needed(*cal.first_tested[::-1], SHOWN_MAX_ERROR)}
    rng = random.Random(f"{run.cfg.seed}:coverage:{run.learner.version}")
    sample = unanswered if len(unanswered) <= COVERAGE_SAMPLE else rng.sample(unanswered, COVERAGE_SAMPLE)
    sure = (run.guess(sample).max(1).values >= cal.threshold).float().mean().item() if sample else 0.0
    return {**out, "autolabel_threshold": cal.threshold, "autolabel_covered": round(sure * len(unanswered))}


def recheck_row(run, index, answer, policy_version):
    """The store row of a recheck's answer (FeedbackStore.add_recheck's arguments)."""
    return dict(sha1=run.ds.hash_of(index), path=run.ds.paths[index], earlier=run.answer_of[index], answer=answer,
                policy_version=policy_version, epoch=run.epoch)
