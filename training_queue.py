"""What the next updates train on: the answered images and verdicts "no" waiting for an update, the unanswered
images that learn from the reward model's rewards, the epoch's rewards of the guesses shown, and which
answers the reward model has been fitted on (only answers it has not seen measure it; those it has are
replayed to it).
"""
import random


class TrainingQueue:
    """The epoch's training queues and the reward model's fitted set, keyed by pool position and verdict key."""

    def __init__(self, seed):
        self.rng = random.Random(f"{seed}:replay")
        self.rm_fitted, self.no_fitted = set(), set()  # positions / verdict keys the reward model was fitted on
        self.fitted_hashes = self.fitted_rows = None  # what the checkpoint says it was fitted on (None: all)
        self.begin_epoch()

    def begin_epoch(self):
        self.visited = set()           # pool positions queued for training in this epoch
        self.pending = []              # answered, waiting for the next update
        self.pending_no = []           # keys of verdicts "no" waiting for the next update
        self.no_queued = set()         # keys of verdicts "no" queued in this epoch
        self.unanswered = []           # skipped or never asked, for reward-model updates
        self.rewards = {}              # +1/-1 of the shown guess of each answer given this epoch

    def waiting(self):
        """Answers and verdicts "no" waiting for an update."""
        return len(self.pending) + len(self.pending_no)

    def visit(self, index, labelled, no_keys):
        """Queue an image for training in this epoch: with its label, or through the reward model (and each
        "no" it had, on its logged class)."""
        if index in self.visited:
            return
        self.visited.add(index)
        if labelled:
            self.pending.append(index)
            return
        self.unanswered.append(index)
        for key in no_keys:
            self.queue_no(key)

    def queue_no(self, key):
        if key not in self.no_queued:
            self.no_queued.add(key)
            self.pending_no.append(key)

    def take(self, batch_size, rm_only, unanswered):
        """(new answers, verdicts "no", unanswered images) for one update, out of the queues."""
        new = [] if rm_only else self.pending[:batch_size]
        nos = [] if rm_only else self.pending_no[:batch_size - len(new)]
        self.pending, self.pending_no = self.pending[len(new):], self.pending_no[len(nos):]
        take, self.unanswered = self.unanswered[:unanswered], self.unanswered[unanswered:]
        return new, nos, take

    def forget(self, index, unanswered=True):
        """An undone answer: out of this epoch's queues (unanswered=False: the label queue alone), visited again
        when it is answered again."""
        self.visited.discard(index)
        for queued in (self.pending, self.unanswered) if unanswered else (self.pending,):
            if index in queued:
                queued.remove(index)

    def forget_answer(self, index):
        """An undone answer leaves the queues and the epoch's rewards; True when the reward model was fitted on it."""
        self.forget(index)
        self.rewards.pop(index, None)
        fitted = index in self.rm_fitted
        self.rm_fitted.discard(index)
        return fitted

    def forget_verdict(self, v, still_labelled):
        """An undone verdict leaves the queues (with the label it made, unless the image is `still_labelled`);
        True when the reward model was fitted on it."""
        self.rewards.pop(("verdict", v.key), None)
        if v.key in self.pending_no:
            self.pending_no.remove(v.key)
        if not still_labelled:
            self.forget(v.image, unanswered=False)
        fitted = v.key in self.no_fitted or bool(v.verdict and v.image in self.rm_fitted)
        self.no_fitted.discard(v.key)
        if v.verdict:
            self.rm_fitted.discard(v.image)
        return fitted

    def fresh(self, new, nos, ledger):
        """(which new labels the reward model meets for the first time, the verdict keys it has not been fitted
        on): they measure it. A label from a yes counts as a verdict, an implied one as neither."""
        yes_of = {i: ledger.yes_key(i) for i in new}
        fresh = [i not in self.rm_fitted and yes_of[i] is None and not ledger.is_implied(i) for i in new]
        verdicts = ([yes_of[i] for i in new if yes_of[i] is not None and i not in self.rm_fitted]
                    + [k for k in nos if k not in self.no_fitted])
        return fresh, verdicts

    def episode(self, epoch):
        """The epoch's record for training_data.json: how many guesses were judged and their mean reward."""
        n = len(self.rewards)
        return {"epoch": epoch, "total_samples": n, "mean_reward": sum(self.rewards.values()) / n if n else 0.0}

    def restore_fitted(self, hashes, rows, pool_hashes, ledger):
        """What a checkpoint says the reward model had learnt (content hashes, verdict store ids)."""
        self.fitted_hashes, self.fitted_rows = set(hashes), set(rows)
        self.rm_fitted = {i for i in self.rm_fitted if pool_hashes[i] in self.fitted_hashes}
        self.no_fitted = {v.key for v in ledger.live_verdicts() if v.row in self.fitted_rows}

    def replay(self, new, nos, labelled, live_no, room):
        """Labels and verdicts "no" the reward model was fitted on, drawn to fill `room` places beside the new
        ones (labelled(i), live_no(key): still an answer to learn from)."""
        new_set, no_set = set(new), set(nos)
        pool = [("label", i) for i in sorted(self.rm_fitted) if i not in new_set and labelled(i)]
        pool += [("no", k) for k in sorted(self.no_fitted) if k not in no_set and live_no(k)]
        pick = self.rng.sample(pool, min(len(pool), max(0, room)))
        return [i for kind, i in pick if kind == "label"], [k for kind, k in pick if kind == "no"]

    def fitted(self, new, nos):
        self.rm_fitted.update(new)
        self.no_fitted.update(nos)

    def counts_as_fitted(self, sha1=None, row=None):
        """Whether a stored answer (its content hash) or verdict (its store id) was learnt before this session:
        all were, unless the checkpoint says which."""
        if sha1 is not None:
            return self.fitted_hashes is None or sha1 in self.fitted_hashes
        return self.fitted_rows is None or row in self.fitted_rows
