"""Every answer of a run in one record: labels, skips, imported labels, verdicts, the classes rejected and the
label they imply. Torch-free, so the loop, the labeling window's class tally and `--export` all read it.

    ledger = AnswerLedger.from_store(store.rows(), store.verdicts(), num_classes)   # keyed by content hash
    ledger.label_of[sha1], ledger.rejected(sha1), ledger.counts()

An image's label follows from its events, recomputed whenever one is added or undone: the latest label the
person gave (a class, a correction, a yes, a changed answer to a recheck), else, when every class but one was
rejected, the one left (`implied`). Undo removes the event and recomputes, so nothing is reversed by hand.
"""
from collections import Counter
from dataclasses import dataclass

from feedback_store import IMPORTED as IMPORT  # the store's kind of a row from --import-labels
from verdict_posterior import net_verdicts

SKIP = None
IMPLIED = "implied"
VERDICT_YES = "verdict-yes"
RECHECK = "recheck"      # an answer changed when the image was asked again (--recheck)
CONFIRMED = "confirmed"  # asked again, the same answer (or a skip): the earlier one stands


@dataclass(frozen=True)
class Verdict:
    """One yes (1) or no (0) to the class `proposed` for `image`, which the proposing rule gave probability
    `behaviour`; `row` is its id in the store (None on processes that hold none), `key` its place here."""
    key: int
    row: object
    image: object
    proposed: int
    behaviour: float
    verdict: int
    version: int
    seq: int = 0


@dataclass(frozen=True)
class Answer:
    """A class (or SKIP) given for `image`; kind: label, correction, skip or import. `seq` orders it among
    the verdicts, so the latest label wins."""
    image: object
    answer: object
    kind: str
    seq: int


class AnswerLedger:
    """The answers and verdicts of one run, keyed by image (a pool position in the loop, a content hash in the
    window and the export), with each image's label derived from them."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.answers = {}          # image -> Answer
        self.verdicts = []         # Verdict by key; None where undone
        self.verdict_keys = {}     # image -> keys of its live verdicts, oldest first
        self.label_of = {}         # image -> class or SKIP: every image that has an answer, a yes or an implied label
        self.kind_of = {}          # image -> how its label came: label, correction, skip, import, verdict-yes, implied
        self.kinds = Counter(self.kind_of.values())  # kept with kind_of, so the counts below cost nothing
        self.nos = 0               # live verdicts "no"
        self.rechecks = {}         # image -> (Answer, store row) of each recheck's answer, oldest first
        self.recheck_total = 0     # live rechecks: each was a question asked
        self.seq = 0

    @classmethod
    def from_store(cls, answers, verdicts, num_classes, rechecks=()):
        """The ledger of a store's rows (FeedbackStore.rows(), .verdicts() and .rechecks()), keyed by content
        hash; rows of classes the run does not have are left out."""
        ledger = cls(num_classes)
        for a in answers:
            if a["answer"] is SKIP or 0 <= a["answer"] < num_classes:
                ledger.add_answer(a["sha1"], a["answer"], answer_kind(a))
        for v in verdicts:
            if 0 <= v["proposed"] < num_classes:
                ledger.add_verdict(v["sha1"], v["proposed"], v["behaviour_prob"], v["verdict"],
                                   v["policy_version"], row=v["id"])
        for r in rechecks:
            if r["sha1"] in ledger.answers and (r["answer"] is SKIP or 0 <= r["answer"] < num_classes):
                ledger.add_recheck(r["sha1"], r["answer"], r["id"])
        return ledger

    # --- events -------------------------------------------------------------------------------
    def add_answer(self, image, answer, kind="label"):
        """A class (or SKIP) given for image; it replaces an earlier answer of the image."""
        self.seq += 1
        self.answers[image] = Answer(image, answer, "skip" if answer is SKIP else kind, self.seq)
        self._settle(image)

    def undo_answer(self, image):
        """Take back the answer of image; returns it (None when there was none)."""
        gone = self.answers.pop(image, None)
        self._settle(image)
        return gone

    def add_verdict(self, image, proposed, behaviour, verdict, version, row=None):
        """A yes (1) or no (0) to `proposed` for image; returns its Verdict."""
        self.seq += 1
        v = Verdict(len(self.verdicts), row, image, int(proposed), float(behaviour), int(verdict), version, self.seq)
        self.verdicts.append(v)
        self.verdict_keys.setdefault(image, []).append(v.key)
        self.nos += not v.verdict
        self._settle(image)
        return v

    def undo_verdict(self, key):
        """Take back the verdict with this key; returns it."""
        v = self.verdicts[key]
        self.verdicts[key] = None
        self.verdict_keys[v.image].remove(v.key)
        self.nos -= not v.verdict
        self._settle(v.image)
        return v

    def add_recheck(self, image, answer, row=None):
        """The answer (a class, or SKIP) to a recheck of image: it changes the label when it differs from it
        (the earlier answer stays on record, the latest wins); the same class or a skip confirms it."""
        self.seq += 1
        kind = RECHECK if answer is not SKIP and answer != self.label_of.get(image) else CONFIRMED
        self.rechecks.setdefault(image, []).append((Answer(image, answer, kind, self.seq), row))
        self.recheck_total += 1
        self._settle(image)
        return kind

    def undo_recheck(self, image):
        """Take back the latest recheck answer of image; returns its store row."""
        _, row = self.rechecks[image].pop()
        if not self.rechecks[image]:
            del self.rechecks[image]
        self.recheck_total -= 1
        self._settle(image)
        return row

    def verdict_by_row(self, row):
        """The live verdict with store id `row`."""
        return next(v for v in self.verdicts if v is not None and v.row == row)

    # --- what follows from them ---------------------------------------------------------------
    def _settle(self, image):
        # The one place the rule lives: the latest label given wins; else the last class left is the label.
        answer = self.answers.get(image)
        changed = [a for a, _ in self.rechecks.get(image, ()) if a.kind == RECHECK]
        if changed and answer is not None:
            answer = changed[-1]
        yes = [self.verdicts[k] for k in self.verdict_keys.get(image, ()) if self.verdicts[k].verdict]
        label = kind = None
        if yes and (answer is None or yes[-1].seq > answer.seq):
            label, kind = yes[-1].proposed, VERDICT_YES
        elif answer is not None:
            label, kind = answer.answer, answer.kind
        elif len(self.allowed(image)) == 1:
            label, kind = self.allowed(image)[0], IMPLIED
        old = self.kind_of.pop(image, None)
        if old is not None:
            self.kinds[old] -= 1
        if kind is None:
            self.label_of.pop(image, None)
            return
        self.label_of[image], self.kind_of[image] = label, kind  # an image keeps its place in label_of
        self.kinds[kind] += 1

    def rejected(self, image):
        """Classes the person said no to for image."""
        return {self.verdicts[k].proposed for k in self.verdict_keys.get(image, ()) if not self.verdicts[k].verdict}

    def allowed(self, image):
        """Classes still to propose for image: every class it was not rejected for."""
        rejected = self.rejected(image)
        return [c for c in range(self.num_classes) if c not in rejected]

    def net_verdicts(self, image):
        """Yes minus no per class of image's live verdicts: the evidence of its posterior (verdict_posterior.py)."""
        keys = self.verdict_keys.get(image, ())
        return net_verdicts(((self.verdicts[k].proposed, self.verdicts[k].verdict) for k in keys), self.num_classes)

    def verdict_count(self, image):
        return len(self.verdict_keys.get(image, ()))

    def yes_key(self, image):
        """Key of the yes that labels image, or None."""
        return None if self.kind_of.get(image) != VERDICT_YES else next(
            k for k in reversed(self.verdict_keys[image]) if self.verdicts[k].verdict)

    def no_keys(self, image):
        """Keys of image's live verdicts "no", oldest first."""
        return [k for k in self.verdict_keys.get(image, ()) if not self.verdicts[k].verdict]

    def is_implied(self, image):
        return self.kind_of.get(image) == IMPLIED

    def is_imported(self, image):
        return self.kind_of.get(image) == IMPORT

    def live_verdicts(self):
        return [v for v in self.verdicts if v is not None]

    def given(self):
        """What --max-answers counts: answers and skips the person gave, every verdict and every recheck (an
        implied label adds nothing, and an imported one was never asked)."""
        return len(self.label_of) - self.kinds[IMPLIED] - self.kinds[IMPORT] + self.nos + self.recheck_total

    def imported_count(self):
        return self.kinds[IMPORT]

    def labelled(self):
        """Images with a class (not a skip)."""
        return [i for i, c in self.label_of.items() if c is not SKIP]

    def counts(self, imported=False):
        """Labels per class (imported ones only with imported=True: they are not the person's)."""
        out = [0] * self.num_classes
        for image, c in self.label_of.items():
            if c is not SKIP and (imported or self.kind_of[image] != IMPORT):
                out[c] += 1
        return out


def answer_kind(row):
    """The kind of a stored answer row (rows from before the column existed are labels)."""
    return row.get("kind") or ("skip" if row["answer"] is None else "label")
