"""The RLHF loop, in one place: which image to ask, what an answer does, when the models update, how an
epoch ends. The headless labeler (`run_headless`), the labeling window's worker threads and the benchmark
all drive the same `RLHFRun`; none keeps its own copy of the loop.

One epoch, as every driver sees it:
    index = run.next_question()          # the image to ask next (None: this epoch asks no more)
    run.record(index, answer, probs, v)  # the person's answer (or SKIP) about it; probs: the guess shown
    if run.update_due(): run.update()    # reward model fit + PPO every --batch-size answers
    run.finish_epoch()                   # the rest of the pool, leftover answers, unanswered images; save

Questions come first in each epoch: with --order uncertain the least sure image under the newest ranking
(re-ranked after every update), with a share picked at random (--explore); before the first update, and
with --order random/sequential, in the epoch's seeded order. Then every image not visited yet is visited
in that order, so answered images train again and the rest train through the reward model.

Under torchrun every process runs the same RLHFRun on the same answers; only rank 0 holds the store
(`store` is None elsewhere) and writes files, so the folder is the same as a one-process run's.
"""
import contextlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass

import torch

from checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, atomic_write_json, load_checkpoint,
                        save_checkpoint, update_latest_link)
from feature_cache import FeatureCache, weights_digest
from feedback_store import FeedbackStore, StoreError
from label_transfer import import_labels
from learner import Learner, evaluate_accuracy

REFERENCE_NAME = "reference.pt"
SKIP = None
DISAGREE_BONUS = 0.5   # how much less sure an image counts when a fully trusted reward model disagrees
DEFAULT_SCORE_POOL = 64  # unasked images per ranking that cost a forward pass (all, or uncached features)


def question_order(indices, margins, disagree, disagree_bonus=DISAGREE_BONUS):
    """Order images for asking: smallest margin between the two likeliest classes first, and an image
    on which the policy and the reward model disagree counts as `disagree_bonus` less sure."""
    keyed = sorted(zip(indices, margins, disagree), key=lambda t: (t[1] - disagree_bonus * bool(t[2]), t[0]))
    return [i for i, _, _ in keyed]


def epoch_order(n, seed, epoch, order):
    """Pool positions in the order epoch `epoch` visits them: folder order, or a seeded shuffle."""
    positions = list(range(n))
    if order != "sequential":
        random.Random(f"{seed}:order:{epoch}").shuffle(positions)
    return positions


@dataclass
class Verdict:
    """One yes (1) or no (0) of the person to the class `proposed` for image `index`, which the proposing
    rule gave probability `behaviour` (row: its id in the store, None on processes that hold none)."""
    row: object
    index: int
    proposed: int
    behaviour: float
    verdict: int
    version: int
    key: int = -1  # position in RLHFRun.verdicts


class NullObserver:
    """What RLHFRun tells whoever drives it (the window's trainer listens; the headless loop does not)."""

    def update_started(self, number):
        """An update (number) or, with None, a reward-model refit is about to run."""

    def update_done(self, metrics):
        """It finished, with these metrics (None after a refit)."""


class RLHFRun:
    """One run: the pool, the person's answers, the Learner and the run folder, and the loop over them."""

    def __init__(self, cfg, dataset, learner, store, run_dir, weights_origin, val_dataset=None):
        self.cfg, self.ds, self.learner, self.store = cfg, dataset, learner, store
        self.run_dir, self.weights_origin, self.val = run_dir, weights_origin, val_dataset
        self.ranks = learner.ranks
        self.is_main = self.ranks.is_main
        self.log = print if self.is_main else (lambda *_: None)
        self.observer = NullObserver()
        self.lock = threading.RLock()  # question state: the window's guesser asks while its trainer records
        self.epoch = 0                 # completed epochs
        self.asked_this_run = 0
        self.episodes = []             # per epoch: mean reward of the shown guesses (training_data.json)
        self.rng = random.Random(f"{cfg.seed}:replay")
        self.saved_at, self.saved_state = time.monotonic(), None
        self.cache = None
        if learner.finetune != "all":
            key = f"{learner.finetune}-{dataset.image_size}-{weights_digest(learner.encoder)}"
            self.cache = FeatureCache(run_dir, learner.encode, key)
        # every process reads the cache before rank 0 can write it: the broadcast waits for all of them
        by_hash, stored_verdicts, imported = self.ranks.broadcast(
            (store.answers(), store.verdicts(), store.imported()) if store is not None else None)
        self.answer_of, self.imported = {}, set()  # imported: labels from --import-labels
        self.verdicts = []             # Verdict records, in the order given (None where undone)
        self.rejected = {}             # pool position -> classes the person said no to
        self.no_keys = {}              # pool position -> keys of its verdicts "no"
        self.yes_from = {}             # pool position -> key of the verdict "yes" that labelled it
        self.implied = set()           # labelled because every other class was rejected
        self.no_count = 0
        self.shown_of = {}             # pool position -> class shown with the answer given in this process
        # what the store holds, by content hash: linked to pool positions as their hashes are known (a new
        # folder's are read in the background, see dataset.py)
        self.stored_answers, self.stored_imported = by_hash, imported
        self.stored_verdicts = {}
        for row in stored_verdicts:
            self.stored_verdicts.setdefault(row["sha1"], []).append(row)
        self.fitted_hashes = self.fitted_rows = None  # what the checkpoint says the reward model was fitted on
        self.rm_fitted, self.no_fitted = set(), set()
        self.linked = 0                # how many of dataset.arrived have been linked
        self.slot, self.outstanding = {}, set()  # (set by begin_epoch)
        self._link([(i, h) for i, h in enumerate(dataset.hashes) if h is not None])
        self.begin_epoch()

    def inputs(self, indices):
        """What the learner takes for these pool images: cached frozen-layer features, or the images."""
        if self.cache is not None:
            return self.cache.batch(self.ds, list(indices))
        return self.ds.batch(list(indices))

    def _link(self, pairs):
        """Give pool positions (index, content hash) what the store holds about their pictures: answers,
        imported labels, then verdicts in the order given. The reward model counts as fitted on them (only
        answers given later measure it) unless the checkpoint says otherwise."""
        verdict_rows, answered = [], []
        for i, h in pairs:
            if i in self.answer_of or i in self.outstanding:  # asked again in this session already
                continue
            if h in self.stored_answers:
                self.answer_of[i] = self.stored_answers[h]
                answered.append(i)
                if h in self.stored_imported:
                    self.imported.add(i)
            verdict_rows += [(row, i) for row in self.stored_verdicts.pop(h, ())]  # one position per picture
        for row, i in sorted(verdict_rows, key=lambda t: t[0]["id"]):
            self._add_verdict(Verdict(row["id"], i, row["proposed"], row["behaviour_prob"], row["verdict"],
                                      row["policy_version"]))
            if not row["verdict"] and (self.fitted_rows is None or row["id"] in self.fitted_rows):
                self.no_fitted.add(self.verdicts[-1].key)
            answered.append(i)
        for i in answered:
            if self.answer_of.get(i, SKIP) is not SKIP and (self.fitted_hashes is None
                                                            or self.ds.hashes[i] in self.fitted_hashes):
                self.rm_fitted.add(i)
            if i in self.answer_of:
                self._take(i)

    def link_arrived(self):
        """Link the pool positions whose content hashes were read since the last call (a picture answered
        in an earlier session whose file was not in the hash cache is then not asked again)."""
        arrived = self.ds.arrived
        if self.linked == len(arrived):
            return
        fresh, self.linked = arrived[self.linked:], len(arrived)
        if self.stored_answers or self.stored_verdicts:
            with self.lock:
                self._link([(i, self.ds.hashes[i]) for i in fresh if self.ds.hashes[i] is not None])

    def answered_count(self):
        return sum(1 for a in self.answer_of.values() if a is not SKIP)

    def reward_model_ready(self):
        """The reward model's rewards train the policy once it predicts new answers better than chance."""
        return not self.cfg.no_reward_model and self.learner.rm_reliability() > 0

    # --- questions ----------------------------------------------------------------------------
    def begin_epoch(self):
        """Reset the epoch's visits and the images still to ask, in the epoch's order."""
        with self.lock:
            self.order = epoch_order(len(self.ds), self.cfg.seed, self.epoch, self.cfg.order)
            self.unasked = [i for i in self.order if i not in self.answer_of]
            self.slot = {i: k for k, i in enumerate(self.unasked)}  # position in unasked: O(1) removal
            self.order_head, self.ranking, self.ranking_head = 0, None, 0
            self.outstanding = set()   # handed out to be asked, no answer yet
            self.ask_rng = random.Random(f"{self.cfg.seed}:ask:{self.epoch}")
            self.rank_rng = random.Random(f"{self.cfg.seed}:rank:{self.epoch}")
            self.propose_rng = random.Random(f"{self.cfg.seed}:propose:{self.epoch}")
        self.visited = set()           # pool positions queued for training in this epoch
        self.pending = []              # answered, waiting for the next update
        self.pending_no = []           # keys of verdicts "no" waiting for the next update
        self.no_queued = set()         # keys of verdicts "no" queued in this epoch
        self.unanswered = []           # skipped or never asked, for reward-model updates
        self.epoch_rewards = {}        # +1/-1 of the shown guess of each answer given this epoch

    def answers_given(self):
        """What --max-answers counts: labels, skips and verdicts (a class implied by no's adds nothing, and
        an imported label was never asked)."""
        return len(self.answer_of) - len(self.implied) - len(self.imported) + self.no_count

    def can_ask(self):
        limit = self.cfg.max_answers
        return bool(self.unasked) and (limit is None or self.answers_given() + len(self.outstanding) < limit)

    def next_question(self):
        """Hand out the image to ask next, or None when this epoch asks no more."""
        self.link_arrived()
        with self.lock:
            while self.can_ask():
                if self.ranking is not None and self.ask_rng.random() < self.cfg.explore:
                    index = self.ask_rng.choice(self.unasked)  # --explore: a share of the ranked ones at random
                else:
                    index = self._next_ranked()
                self._take(index)
                # the pool is read lazily: a file that stopped decoding since the scan is warned about once
                # (dataset.py) and never asked
                if self.ds.readable(index):  # reads the file's hash too, when the pool had not read it yet
                    self.link_arrived()
                    if index in self.answer_of:  # answered in an earlier session: known only now
                        continue
                    self.outstanding.add(index)
                    self.ds.start_reading()  # a new folder's files: read now that the first question is out
                    return index
            return None

    def _take(self, index):
        # Out of the unasked images in O(1): the last one takes its place.
        if index in self.slot:
            k, last = self.slot.pop(index), self.unasked.pop()
            if last != index:
                self.unasked[k], self.slot[last] = last, k

    def _put_back(self, index):
        # Askable again (a "no" leaves other classes to propose); reached by the next ranking or the fallback.
        if index not in self.slot:
            self.slot[index] = len(self.unasked)
            self.unasked.append(index)

    def _next_ranked(self):
        # The newest ranking first; a used-up or missing one falls back to the epoch's order.
        for queue_name, head_name in (("ranking", "ranking_head"), ("order", "order_head")):
            queue, head = getattr(self, queue_name) or [], getattr(self, head_name)
            while head < len(queue) and queue[head] not in self.slot:
                head += 1
            setattr(self, head_name, head)
            if head < len(queue):
                return queue[head]
        return self.unasked[0]  # only images put back after a "no" are left

    def next_questions(self, n):
        """Up to n questions at once (the headless loop asks a round together)."""
        out = []
        while len(out) < n and (index := self.next_question()) is not None:
            out.append(index)
        return out

    def questions_done(self):
        """True when this epoch hands out no more questions and every one handed out is answered."""
        with self.lock:
            return not self.can_ask() and not self.outstanding

    def questions_left(self):
        """Questions this epoch may still hand out."""
        with self.lock:
            limit = self.cfg.max_answers
            room = len(self.unasked) if limit is None else limit - self.answers_given() - len(self.outstanding)
            return max(0, min(len(self.unasked), room))

    def refresh_ranking(self):
        """--order uncertain: rank the unasked images with the current models (nothing before the first
        update: an untrained policy's margins say nothing about the person)."""
        if self.cfg.order != "uncertain" or self.learner.version == 0 or not self.can_ask():
            return
        with self.lock:
            unasked = list(self.unasked)
        ranking = self.rank_questions(unasked, self.rank_rng)
        with self.lock:
            self.ranking, self.ranking_head = ranking, 0

    def rank_questions(self, unasked, rng):
        """Score a sample of the unasked images with the current models; most informative first."""
        if self.cache is not None and not self.cfg.score_pool:
            # frozen features: every image whose features are cached costs a matrix product, the others a
            # forward pass through the frozen layers, so a bounded sample of those joins each ranking
            cached, fresh = [], []
            for i in unasked:
                (cached if self.cache.has(self.ds, i) else fresh).append(i)
            pool = cached + (fresh if len(fresh) <= DEFAULT_SCORE_POOL else rng.sample(fresh, DEFAULT_SCORE_POOL))
        else:
            limit = self.cfg.score_pool or DEFAULT_SCORE_POOL
            pool = unasked if len(unasked) <= limit else rng.sample(unasked, limit)
        trust = 0.0 if self.cfg.no_reward_model else self.learner.rm_reliability()
        probs, disagree = [], []
        for start in range(0, len(pool), self.cfg.score_batch):
            x = self.inputs(pool[start:start + self.cfg.score_batch])
            p = self.learner.policy_probs(x)
            probs.append(p)
            rm = self.learner.predicted_rewards(x).argmax(1) if trust > 0 else p.argmax(1)
            disagree.append(rm != p.argmax(1))
        probs, disagree = torch.cat(probs), torch.cat(disagree)
        top2 = probs.topk(2, dim=1).values
        return question_order(pool, (top2[:, 0] - top2[:, 1]).tolist(), disagree.tolist(), DISAGREE_BONUS * trust)

    def guess(self, indices):
        """The current policy's class probabilities for pool images (what the person is shown)."""
        return self.learner.policy_probs(self.inputs(indices))

    # --- answers ------------------------------------------------------------------------------
    def answer_row(self, index, answer, probs, policy_version):
        """The store row of an answer: the guess shown (argmax of probs), its probability, the answer and
        the reward of the shown guess (+1 right, -1 wrong, None for a skip)."""
        shown = int(probs.argmax())
        kind = "skip" if answer is SKIP else "correction" if self.cfg.ask == "verdict" else "label"
        return dict(sha1=self.ds.hash_of(index), path=self.ds.paths[index], answer=answer, predicted=shown,
                    probability=float(probs[shown]),
                    reward=None if answer is SKIP else (1.0 if shown == answer else -1.0),
                    policy_version=policy_version, epoch=self.epoch, kind=kind)

    def record(self, index, answer, probs, policy_version, commit=True):
        """The person's answer (class index or SKIP) about image `index`, shown with guess `probs`;
        commit=False when the caller (the labeling window) has already committed the same row itself."""
        row = self.answer_row(index, answer, probs, policy_version)
        if commit and self.store is not None:
            self.store.add(**row)
        with self.lock:
            self.outstanding.discard(index)
            self._take(index)  # answered without being handed out (a caller that picks its own)
            self.answer_of[index] = answer
        self.asked_this_run += 1
        if answer is not SKIP:
            self.shown_of[index] = row["predicted"]
            self.epoch_rewards[index] = row["reward"]
        self.visit(index)

    def learn_imported(self, indices):
        """Labels just imported: queued for the next updates, as new answers the reward model has not seen."""
        for index in indices:
            self.rm_fitted.discard(index)
            self.visit(index)

    def visit(self, index):
        """Queue an image for training in this epoch: with its answer, or through the reward model (and
        each "no" it had, on its logged class)."""
        if index in self.visited:
            return
        self.visited.add(index)
        if self.answer_of.get(index, SKIP) is not SKIP:
            self.pending.append(index)
            return
        self.unanswered.append(index)
        for key in self.no_keys.get(index, ()):
            if key not in self.no_queued:
                self.no_queued.add(key)
                self.pending_no.append(key)

    def undo(self, index, commit=True):
        """Take back the answer about image `index`: it leaves the store, the queues and the epoch's
        rewards, and is handed out again. Returns True when the reward model had been fitted on it (then
        call refit_reward_model)."""
        if commit and self.store is not None:
            self.store.remove(self.ds.hash_of(index))
        with self.lock:
            answer = self.answer_of.pop(index, SKIP)
            self.outstanding.add(index)
        self.asked_this_run -= 1
        self.visited.discard(index)
        for queued in (self.pending, self.unanswered):
            if index in queued:
                queued.remove(index)
        self.epoch_rewards.pop(index, None)
        self.shown_of.pop(index, None)
        fitted = index in self.rm_fitted
        self.rm_fitted.discard(index)
        return fitted and answer is not SKIP and not self.cfg.no_reward_model

    def refit_reward_model(self):
        """A few reward-model steps on the answers it was fitted on, after one of them was undone."""
        fitted = sorted(i for i in self.rm_fitted if self.answer_of.get(i, SKIP) is not SKIP)
        if not fitted:
            return
        pick = self.rng.sample(fitted, min(len(fitted), self.learner.rm_cfg.rm_batch_size))
        self.observer.update_started(None)
        self.learner.fit_reward_model(self.inputs(pick), torch.tensor([self.answer_of[i] for i in pick]))
        self.observer.update_done(None)

    # --- verdicts (--ask verdict) ---------------------------------------------------------------
    def allowed_classes(self, index):
        """The classes still to propose for an image: a class the person rejected is never proposed again."""
        return [c for c in range(self.ds.num_classes) if c not in self.rejected.get(index, ())]

    def propose(self, index, probs):
        """(class to propose for image `index`, the probability the --propose rule gave it), from the
        policy's probs: 'sample' draws from the policy, 'greedy' takes its likeliest class; both among the
        classes not rejected, mixed with --propose-explore of a uniform draw. The probability is logged with
        the verdict, so PPO can correct for the rule."""
        allowed = self.allowed_classes(index)
        p = torch.as_tensor(probs, dtype=torch.float64)[allowed]
        eps, n = self.cfg.propose_explore, len(allowed)
        if self.cfg.propose == "greedy":
            rule = torch.full((n,), eps / n, dtype=torch.float64)
            rule[int(p.argmax())] += 1.0 - eps
        else:
            rule = (1.0 - eps) * p / p.sum().clamp_min(1e-12) + eps / n
        with self.lock:
            k = self.propose_rng.choices(range(n), weights=rule.tolist())[0]
        return allowed[k], float(rule[k] / rule.sum())

    def _add_verdict(self, v):
        v.key = len(self.verdicts)
        self.verdicts.append(v)
        if v.verdict:
            self.answer_of[v.index], self.yes_from[v.index] = v.proposed, v.key
            return
        self.no_count += 1
        self.no_keys.setdefault(v.index, []).append(v.key)
        self.rejected.setdefault(v.index, set()).add(v.proposed)
        left = self.allowed_classes(v.index)
        if len(left) == 1 and v.index not in self.answer_of:  # every other class rejected: a label
            self.answer_of[v.index] = left[0]
            self.implied.add(v.index)

    def record_verdict(self, index, proposed, behaviour, verdict, policy_version, commit=True, row=None):
        """The person's yes (1) or no (0) to `proposed` for image `index`; a yes is a full label, a no
        leaves the other classes to propose later. commit=False when the caller committed it (row: its id).
        Returns the verdict's key."""
        if commit and self.store is not None:
            row = self.store.add_verdict(self.ds.hash_of(index), self.ds.paths[index], proposed, behaviour,
                                         verdict, self.cfg.propose, policy_version, self.epoch)
        v = Verdict(row, index, int(proposed), float(behaviour), int(verdict), policy_version)
        with self.lock:
            self.outstanding.discard(index)
            self._take(index)
            self._add_verdict(v)
            if index not in self.answer_of and len(self.allowed_classes(index)) > 1:
                self._put_back(index)
        self.asked_this_run += 1
        self.epoch_rewards[("verdict", v.key)] = 1.0 if verdict else -1.0
        if index in self.answer_of:
            self.visit(index)   # a yes, or the last class left after the no's: a label
        else:
            self.no_queued.add(v.key)
            self.pending_no.append(v.key)
        return v.key

    def undo_verdict(self, row, commit=True):
        """Take back the verdict with store id `row`: it is handed out again. True when the reward model had
        been fitted on it (then call refit_reward_model)."""
        v = next(v for v in self.verdicts if v is not None and v.row == row)
        if commit and self.store is not None:
            self.store.remove_verdict(row)
        with self.lock:
            self.verdicts[v.key] = None
            if v.verdict:
                self.answer_of.pop(v.index, None), self.yes_from.pop(v.index, None)
            else:
                self.no_count -= 1
                self.no_keys[v.index].remove(v.key)
                self.rejected[v.index].discard(v.proposed)
                if v.index in self.implied:
                    self.implied.discard(v.index), self.answer_of.pop(v.index, None)
            self._take(v.index)
            self.outstanding.add(v.index)
        self.asked_this_run -= 1
        self.epoch_rewards.pop(("verdict", v.key), None)
        if v.key in self.pending_no:
            self.pending_no.remove(v.key)
        if v.index not in self.answer_of:  # the label it made is gone too
            self.visited.discard(v.index)
            if v.index in self.pending:
                self.pending.remove(v.index)
        fitted = v.key in self.no_fitted or bool(v.verdict and v.index in self.rm_fitted)
        self.no_fitted.discard(v.key)
        if v.verdict:
            self.rm_fitted.discard(v.index)
        return fitted and not self.cfg.no_reward_model

    # --- updates ------------------------------------------------------------------------------
    def update_due(self):
        return len(self.pending) + len(self.pending_no) >= self.cfg.batch_size

    def update(self, rm_only=False):
        """One update on the pending answers and verdicts plus some unanswered images; writes metrics and
        checkpoint."""
        self.observer.update_started(self.learner.version + 1)
        t0, bs = time.perf_counter(), self.cfg.batch_size
        new = [] if rm_only else self.pending[:bs]
        nos = [] if rm_only else self.pending_no[:bs - len(new)]
        self.pending, self.pending_no = self.pending[len(new):], self.pending_no[len(nos):]
        n_unans = bs if rm_only else self.cfg.rm_per_update
        take, self.unanswered = self.unanswered[:n_unans], self.unanswered[n_unans:]
        replay, no_replay = self.replay(new, nos)
        # labels the reward model meets for the first time measure it; labels from a yes count as verdicts
        fresh = [i not in self.rm_fitted and i not in self.yes_from and i not in self.implied for i in new]
        shown = [1.0 if self.shown_of[i] == self.answer_of[i] else -1.0
                 for i, f in zip(new, fresh) if f and i in self.shown_of]
        fresh_verdicts = ([self.yes_from[i] for i in new if i in self.yes_from and i not in self.rm_fitted]
                          + [k for k in nos if k not in self.no_fitted])
        shown += [1.0 if self.verdicts[k].verdict else -1.0 for k in fresh_verdicts]
        stats = {}
        if fresh_verdicts:
            vs = [self.verdicts[k] for k in fresh_verdicts]
            stats["rm_verdict_acc"] = self.learner.score_verdicts(
                self.inputs([v.index for v in vs]), torch.tensor([v.proposed for v in vs]),
                torch.tensor([v.verdict for v in vs]))
        stats.update(self.learner.update(
            self.inputs(new), self.labels(new), self.inputs(replay), self.labels(replay),
            self.inputs(take) if (take and self.reward_model_ready()) else None,
            fresh=torch.tensor(fresh, dtype=torch.bool), no=self.no_batch(nos, no_replay)))
        self.rm_fitted.update(new)
        self.no_fitted.update(nos)
        return self.after_update(stats, len(new), len(nos), shown, t0)

    def labels(self, indices):
        return torch.tensor([self.answer_of[i] for i in indices], dtype=torch.long)

    def replay(self, new, nos):
        """Answers and verdicts "no" the reward model was fitted on, drawn to fill its batch beside the new."""
        new_set, no_set = set(new), set(nos)
        pool = [("label", i) for i in sorted(self.rm_fitted)
                if i not in new_set and self.answer_of.get(i, SKIP) is not SKIP]
        pool += [("no", k) for k in sorted(self.no_fitted) if k not in no_set and self.verdicts[k] is not None]
        room = max(0, self.learner.rm_cfg.rm_batch_size - len(new) - len(nos))
        pick = self.rng.sample(pool, min(len(pool), room))
        return [i for kind, i in pick if kind == "label"], [k for kind, k in pick if kind == "no"]

    def no_batch(self, nos, no_replay):
        """The learner's `no` argument: verdicts "no" to learn from and to replay, or None."""
        if not nos and not no_replay:
            return None
        new, old = [self.verdicts[k] for k in nos], [self.verdicts[k] for k in no_replay]
        return (self.inputs([v.index for v in new]), torch.tensor([v.proposed for v in new], dtype=torch.long),
                torch.tensor([v.behaviour for v in new], dtype=torch.float64),
                self.inputs([v.index for v in old]), torch.tensor([v.proposed for v in old], dtype=torch.long))

    def after_update(self, stats, n_labels, n_no, shown, t0):
        """Metrics (printed and in metrics.jsonl), validation, checkpoint and a new ranking."""
        metrics = {"update": self.learner.version, "epoch": self.epoch + 1, "answers": self.answered_count(),
                   "imported": len(self.imported), "asked": len(self.answer_of), "asked_this_run": self.asked_this_run,
                   "human_images": n_labels, **stats, "update_s": time.perf_counter() - t0}
        if self.cfg.ask == "verdict" or self.no_count:
            live = [v for v in self.verdicts if v is not None]
            metrics.update(verdicts=len(live), verdict_no_updated=n_no,
                           yes_share=sum(v.verdict for v in live) / len(live) if live else 0.0)
        if shown:
            metrics["mean_reward"] = sum(shown) / len(shown)  # of what the person was shown
        if self.val is not None and self.cfg.val_every and self.learner.version % self.cfg.val_every == 0:
            metrics["val_acc"] = self.validate()
        self.write_metrics(metrics)
        every = self.cfg.checkpoint_every and self.learner.version % self.cfg.checkpoint_every == 0
        if every or time.monotonic() - self.saved_at >= self.cfg.checkpoint_seconds:
            self.save()
        self.refresh_ranking()
        self.observer.update_done(metrics)
        return metrics

    def finish_epoch(self, stop=lambda: False):
        """Visit the images this epoch has not (training when due), train on the leftover answers and the
        unanswered images, then end the epoch: metrics, export, checkpoint. False when `stop()` came first."""
        for index in self.order:
            if stop():
                return False
            self.visit(index)
            if self.update_due():
                self.update()
        while self.pending or self.pending_no or (self.unanswered and self.reward_model_ready()):
            if stop():
                return False
            self.update(rm_only=not (self.pending or self.pending_no))
        total = sum(self.epoch_rewards.values())
        self.episodes.append({"epoch": self.epoch + 1, "total_samples": len(self.epoch_rewards),
                              "mean_reward": total / len(self.epoch_rewards) if self.epoch_rewards else 0.0})
        self.epoch += 1
        if self.val is not None:
            self.write_metrics({"update": self.learner.version, "epoch": self.epoch, "epoch_end": True,
                                "answers": self.answered_count(), "imported": len(self.imported),
                                "val_acc": self.validate()})
        self.export_training_data()
        self.save()
        self.begin_epoch()
        return True

    def validate(self):
        """Accuracy of the policy on the --val images (split across processes under torchrun)."""
        keep = [i for i in range(len(self.val)) if i not in self.val.unreadable]  # files that are no images
        starts = range(0, len(keep), self.cfg.score_batch)
        return evaluate_accuracy(self.learner.image_probs,
                                 (self.val.batch(keep[s:s + self.cfg.score_batch]) for s in starts),
                                 (torch.tensor([self.val.labels[i] for i in keep[s:s + self.cfg.score_batch]])
                                  for s in starts))

    # --- files --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, path):
        """An OSError while writing a run file (a full disk) as one line; nothing the person gave is lost."""
        try:
            yield
        except OSError as err:
            raise CheckpointError(f"cannot write {path} ({err.strerror or err}): free space on its disk or fix "
                                  "its permissions; every answer is in feedback.sqlite and the last good "
                                  "checkpoint is kept: continue with --resume") from None

    def write_metrics(self, metrics):
        if not self.is_main:
            return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        with self.writing(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        parts = [f"update {metrics['update']:4d}", f"epoch {metrics['epoch']}", f"answers {metrics['answers']}"]
        for key, fmt in (("mean_reward", "reward {:+.2f}"), ("agreement", "agree {:.2f}"),
                         ("approx_kl", "kl {:.4f}"), ("rm_acc", "rm_acc {:.2f}"), ("rm_weight", "rm_w {:.2f}"),
                         ("val_acc", "val_acc {:.3f}"), ("update_s", "{:.2f}s")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        self.log("  ".join(parts))

    def checkpoint_dict(self):
        return {"format_version": FORMAT_VERSION, **self.learner.state_dict(),
                "class_names": list(self.ds.class_names), "image_size": self.ds.image_size,
                "normalization": {"mean": list(self.ds.mean), "std": list(self.ds.std)},
                "weights_origin": self.weights_origin, "arch": "resnet18", "finetune": self.learner.finetune,
                "epoch": self.epoch, "step": self.learner.version, "episodes": self.episodes,
                "config": self.cfg.to_flat(),
                # what the reward model has learnt: answers given after this checkpoint are fresh on resume
                "rm_fitted": sorted(self.ds.hash_of(i) for i in self.rm_fitted),
                "no_fitted": sorted(self.verdicts[k].row for k in self.no_fitted if self.verdicts[k] is not None)}

    def save(self):
        self.saved_at, self.saved_state = time.monotonic(), (self.learner.version, self.epoch)
        if not self.is_main:
            return
        path = os.path.join(self.run_dir, CHECKPOINT_NAME)
        with self.writing(path):
            save_checkpoint(path, self.checkpoint_dict())
            if self.cache is not None:
                self.cache.save()
            update_latest_link(self.run_dir)

    def save_if_changed(self):
        """The checkpoint, unless the last one written holds this very state (the epoch end just wrote it)."""
        if self.saved_state != (self.learner.version, self.epoch):
            self.save()

    def save_reference(self):
        """Write the KL reference once, when the run starts: it never changes afterwards."""
        path = os.path.join(self.run_dir, REFERENCE_NAME)
        if self.is_main and not os.path.isfile(path):
            with self.writing(path):
                save_checkpoint(path, {"format_version": FORMAT_VERSION, "policy": self.learner.reference.state_dict()})

    def restore(self, ckpt):
        """Continue from a checkpoint (and the run's reference policy)."""
        self.learner.load_state_dict(ckpt)
        ref_path = os.path.join(self.run_dir, REFERENCE_NAME)
        if os.path.isfile(ref_path):
            self.learner.reference.load_state_dict(load_checkpoint(ref_path)["policy"])
        self.epoch = int(ckpt["epoch"])
        self.episodes = list(ckpt.get("episodes", []))
        if "rm_fitted" in ckpt:  # format 1 checkpoints were written after every update: all answers fitted
            self.fitted_hashes, self.fitted_rows = set(ckpt["rm_fitted"]), set(ckpt["no_fitted"])
            self.rm_fitted = {i for i in self.rm_fitted if self.ds.hashes[i] in self.fitted_hashes}
            self.no_fitted = {v.key for v in self.verdicts if v is not None and v.row in self.fitted_rows}
        self.begin_epoch()

    def export_training_data(self):
        if not self.is_main:
            return
        feedback = {row["path"]: row["answer"] for row in self.store.rows() if row["answer"] is not None}
        path = os.path.join(self.run_dir, "training_data.json")
        with self.writing(path):
            atomic_write_json(path, {"episodes": self.episodes, "human_feedback": feedback,
                                     "class_names": list(self.ds.class_names)})


def open_run(cfg, run_dir, ds, val, backbone, origin, device, ranks, label_rows=None):
    """The RLHFRun of a run folder (a new one, or resumed from its checkpoint with cfg.resume), with the
    labels of cfg.import_labels (label_rows: that file's rows, on rank 0) stored and queued to learn. Under
    torchrun only rank 0 opens the store; a user error there is raised on every process."""
    learner = Learner(ds.num_classes, backbone, cfg.finetune, cfg.ppo, cfg.rm, device, cfg.seed, ranks)

    def open_store():
        store = FeedbackStore(os.path.join(run_dir, "feedback.sqlite"))
        store.check_classes(ds.class_names)
        store.check_image_set(ds.hashes, ds.all_hashes)
        return store

    store = ranks.on_main(open_store, (StoreError,), share=False)
    report = cfg.import_labels and ranks.on_main(lambda: import_labels(store, ds, cfg.import_labels, label_rows),
                                                 (StoreError,))
    run = RLHFRun(cfg, ds, learner, store, run_dir, origin, val)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if cfg.resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("class_names") != ds.class_names:
            raise CheckpointError(f"{ckpt_path} was trained on classes {ckpt.get('class_names')}, not "
                                  f"{ds.class_names}: pass the run's --images/--classes or a new --out")
        run.restore(ckpt)
    if report:
        run.learn_imported(sorted(i for i, _ in report.added.values()))
        run.log(report.line(ds.root))
    run.save_reference()
    if ranks.is_main:
        with run.writing(os.path.join(run_dir, "config.json")):
            atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_flat())
    return run


def run_headless(run, labeler, stop=lambda: False):
    """The loop with a simulated person, until cfg.epochs or until `stop()` (checked between updates):
    each round asks the questions one update needs, guessed in one batch; under torchrun each process
    asks the labeler about its block of them and the answers are shared. False when stopped early."""
    while run.epoch < run.cfg.epochs:
        run.refresh_ranking()
        while not stop() and (asks := run.next_questions(max(1, run.cfg.batch_size - len(run.pending)
                                                            - len(run.pending_no)))):
            answer_round(run, labeler, asks)
            while run.update_due() and not stop():
                run.update()
        if not run.finish_epoch(stop):
            return False
    return True


def answer_round(run, labeler, asks):
    """The simulated person's answers (or verdicts on proposals) about the round's questions, recorded."""
    probs = run.guess(asks)
    proposals = [run.propose(i, p) for i, p in zip(asks, probs)] if run.cfg.ask == "verdict" else None
    start, end = run.ranks.block(len(asks))
    if proposals is None:
        mine = [labeler.answer(asks[j]) for j in range(start, end)]
    else:
        mine = [labeler.verdict(asks[j], proposals[j][0]) for j in range(start, end)]
    answers = [a for block in run.ranks.gather(mine) for a in block]
    for j, (index, answer, p) in enumerate(zip(asks, answers, probs)):
        if proposals is None or answer is None:  # an answer, or a skip of either kind
            run.record(index, answer, p, run.learner.version)  # committed by the process holding the store
        else:
            run.record_verdict(index, *proposals[j], answer, run.learner.version)
