"""The RLHF loop, in one place: which image to ask, what an answer does, when the models update, how an
epoch ends. The headless labeler (`run_headless`), the labeling window's worker threads and the benchmarks
all drive the same `RLHFRun`; none keeps its own copy of the loop.

One epoch, as every driver sees it:
    index = run.next_question()          # the image to ask next (None: this epoch asks no more)
    run.record(index, answer, probs, v)  # the person's answer (or SKIP), committed by the driver first
    if run.update_due(): run.update()    # reward model fit + PPO every --batch-size answers
    run.finish_epoch()                   # the rest of the pool, leftover answers, unanswered images; save

The pieces: the answers are an AnswerLedger (answer_ledger.py), the questions a QuestionQueue
(question_queue.py), what the next updates train on a TrainingQueue (training_queue.py), the files
RunFiles (run_folder.py). The store is written by the driver that talks to the person (`give_answer`
headless, the window's Tk thread), never here.

Under torchrun every process runs the same RLHFRun on the same answers; only rank 0 holds the store
(`store` is None elsewhere) and writes files, so the folder is the same as a one-process run's.
"""
import os
import random
import time

import torch

from answer_ledger import IMPLIED, RECHECK, SKIP, VERDICT_YES, AnswerLedger
from answer_rechecks import Rechecks, recheck_row
from checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint
from crossfit_trust import CrossfitHalf, crossfit_records, halves_by_image, ledger_rows
from feature_cache import FeatureCache, weights_digest
from feedback_store import FeedbackStore, StoreError
from label_transfer import import_labels
from learner import Learner, UpdateBatch, VerdictBatch, evaluate_accuracy
from neighbour_vote import NeighbourVote
from pool_coverage import PoolCoverage
from question_queue import QuestionQueue, rank_unasked
from run_folder import RunFiles
from score_cache import ScoreCache
from training_queue import TrainingQueue
from verdict_posterior import posterior

BN_SAMPLE = 256  # pool images whose statistics the served models' BatchNorm layers take at an epoch end
CROSSFIT_ROWS = 512  # most answers and verdicts the epoch end's cross-fitted re-measure reads


class NullObserver:
    """What RLHFRun tells whoever drives it (the window's run worker listens; the headless loop does not)."""

    def update_started(self, number):
        """An update (number) or, with None, a reward-model refit is about to run."""

    def update_done(self, metrics):
        """It finished, with these metrics (None after a refit)."""


class RLHFRun:
    """One run: the pool, the person's answers, the Learner and the run folder, and the loop over them."""

    def __init__(self, cfg, dataset, learner, store, run_dir, weights_origin, val_dataset=None):
        self.cfg, self.ds, self.learner, self.store, self.val = cfg, dataset, learner, store, val_dataset
        self.weights_origin, self.ranks = weights_origin, learner.ranks
        self.log = print if self.ranks.is_main else (lambda *_: None)
        self.files = RunFiles(run_dir, self.ranks.is_main, self.log)
        self.observer = NullObserver()
        self.epoch, self.asked_this_run, self.episodes = 0, 0, []  # episodes: per epoch, for training_data.json
        self.saved_at, self.saved_state = time.monotonic(), None
        self.cache = None
        self.scores = ScoreCache()  # what the models said about images since either last changed
        if learner.finetune != "all":
            key = f"{learner.finetune}-{dataset.image_size}-{weights_digest(learner.encoder)}"
            self.cache = FeatureCache(run_dir, learner.encode, key)
        self.ledger = AnswerLedger(dataset.num_classes)  # keyed by pool position
        self.shown_of = {}  # pool position -> class shown with the answer given in this process
        self.prior_of = {}  # pool position -> the guess its last proposal was drawn from (the posterior's prior)
        self.neighbours = NeighbourVote.of_run(cfg, dataset)  # --neighbour-prior (None: the guess alone)
        self.coverage = PoolCoverage.of_run(cfg, dataset)  # --cover-first (None: uncertainty alone)
        self.questions = QuestionQueue(len(dataset), cfg.seed, cfg.order)
        self.lock = self.questions.lock  # the window's guesser asks while its run worker records
        self.training = TrainingQueue(cfg.seed)
        self.rechecks = Rechecks(cfg.recheck if cfg.ask == "label" else 0.0, cfg.seed,
                                 estimate=cfg.ask == "label" and cfg.feedback == "gui")
        # every process reads the store before rank 0 can write it: the broadcast waits for all of them
        self.stored = StoredRows(*self.ranks.broadcast(StoredRows.read(store)))
        self.linked = 0  # how many of dataset.arrived have been linked
        self.remeasured = None  # the rows the last epoch end's re-measure read (remeasure_reward_model)
        link_stored(self, [(i, h) for i, h in enumerate(dataset.hashes) if h is not None])
        self.begin_epoch()

    @property
    def answer_of(self):
        """Pool position -> class (or SKIP) of every image with an answer, a yes or an implied label."""
        return self.ledger.label_of

    def inputs(self, indices):
        """What the learner takes for these pool images: cached frozen-layer features, or the images."""
        if self.cache is not None:
            return self.cache.batch(self.ds, list(indices))
        return self.ds.batch(list(indices))

    def link_arrived(self):
        """Link the pool positions whose content hashes were read since the last call (a picture answered
        in an earlier session whose file was not in the hash cache is then not asked again)."""
        arrived = self.ds.arrived
        if self.linked == len(arrived):
            return
        fresh, self.linked = arrived[self.linked:], len(arrived)
        if self.stored:
            with self.lock:
                link_stored(self, [(i, self.ds.hashes[i]) for i in fresh if self.ds.hashes[i] is not None])

    def reward_model_ready(self):
        """Its rewards train the policy once it beats chance (--policy-update optimum: at once, see learner.py)."""
        optimum = self.cfg.ppo.policy_update == "optimum"
        return not self.cfg.no_reward_model and (optimum or self.learner.rm_reliability() > 0)

    # --- questions ----------------------------------------------------------------------------
    def begin_epoch(self):
        self.questions.begin_epoch(self.epoch, self.answer_of)
        self.training.begin_epoch()

    def can_ask(self):
        limit, q = self.cfg.max_answers, self.questions
        return bool(q.unasked) and (limit is None or self.ledger.given() + len(q.outstanding) < limit)

    def next_question(self):
        """Hand out the image to ask next, or None when this epoch asks no more."""
        self.link_arrived()
        with self.lock:
            if self.can_ask() and (index := self.rechecks.hand_out(self)) is not None:
                return index  # an answer asked again (--recheck)
            while self.can_ask():
                index = self.questions.pick(self.cfg.explore)
                self.questions.take(index)
                # the pool is read lazily: a file that stopped decoding since the scan is warned about once
                # (dataset.py) and never asked
                if self.ds.readable(index):  # reads the file's hash too, when the pool had not read it yet
                    self.link_arrived()
                    if index in self.answer_of and index not in self.questions.confirm:
                        continue  # answered in an earlier session: known only now
                    self.questions.outstanding.add(index)
                    self.ds.start_reading()  # a new folder's files: read now that the first question is out
                    return index
            return None

    def next_questions(self, n):
        """Up to n questions at once (the headless loop asks a round together)."""
        out = []
        while len(out) < n and (index := self.next_question()) is not None:
            out.append(index)
        return out

    def questions_done(self):
        """True when this epoch hands out no more questions and every one handed out is answered."""
        with self.lock:
            return not self.can_ask() and not self.questions.outstanding

    def questions_left(self):
        """Questions this epoch may still hand out."""
        with self.lock:
            limit, q = self.cfg.max_answers, self.questions
            room = len(q.unasked) if limit is None else limit - self.ledger.given() - len(q.outstanding)
            return max(0, min(len(q.unasked), room))

    def refresh_ranking(self):
        """--order uncertain: rank the unasked images (ranked_questions)."""
        if self.cfg.order == "uncertain" and self.can_ask() and (self.learner.version > 0 or self.coverage is not None):
            self.questions.set_ranking(ranked_questions(self))

    def rank_questions(self, unasked, rng):
        """Score a sample of the unasked images with the current models; most informative first."""
        cached = None if self.cache is None else (lambda i: self.cache.has(self.ds, i))
        return rank_unasked(unasked, self.learner, self.inputs, self.cfg, rng, cached, self.scores)

    def guess(self, indices):
        """The current policy's class probabilities for pool images (what the person is shown), kept or computed."""
        return self.scores.policy_probs(self.learner.changes, list(indices),
                                        lambda missing: self.learner.policy_probs(self.inputs(missing)))

    def propose(self, index, probs):
        """(class to propose for image `index`, the probability the --propose rule gave it: logged, so the update
        corrects for it), drawn from its verdicts' posterior (--verdict-evidence hard: never a rejected class).
        The prior is the guess `probs`, times the nearest answered images' vote (--neighbour-prior)."""
        probs = with_neighbours(self, index, probs)
        if not self.posterior_mode():
            return self.questions.propose(probs, self.ledger.allowed(index), self.cfg.propose, self.cfg.propose_explore)
        self.prior_of[index] = [float(p) for p in probs]
        post = posterior(self.prior_of[index], self.ledger.net_verdicts(index), self.learner.flip_rate())
        return self.questions.propose(post, list(range(len(post))), self.cfg.propose, self.cfg.propose_explore)

    def posterior_mode(self):  # --verdict-evidence posterior
        return self.learner.bounded_verdicts()

    # --- answers ------------------------------------------------------------------------------
    def record(self, index, answer, probs, policy_version):
        """The person's answer (class index or SKIP) about image `index`, shown with guess `probs`."""
        if self.rechecks.answered(index):
            return record_recheck(self, index, answer)
        row = answer_row(self, index, answer, probs, policy_version)
        with self.lock:
            self.questions.outstanding.discard(index)
            self.questions.take(index)  # answered without being handed out (a caller that picks its own)
            self.ledger.add_answer(index, answer, row["kind"])
        self.asked_this_run += 1
        if answer is not SKIP and row["predicted"] is not None:
            self.shown_of[index] = row["predicted"]
            self.training.rewards[index] = row["reward"]
        self.visit(index)

    def record_verdict(self, index, proposed, behaviour, verdict, policy_version, row=None):
        """The person's yes (1) or no (0) to `proposed` for image `index` (row: its store id); a yes is a
        label, a no leaves the other classes to propose later. Returns the verdict's key."""
        with self.lock:
            self.questions.outstanding.discard(index)
            self.questions.take(index)
            v = self.ledger.add_verdict(index, proposed, behaviour, verdict, policy_version, row)
            ask_again(self, index)
        self.asked_this_run += 1
        self.training.rewards[("verdict", v.key)] = 1.0 if verdict else -1.0
        if index in self.answer_of:
            self.visit(index)   # a yes, or the last class left after the no's: a label
        if not verdict and (index not in self.answer_of or self.posterior_mode()):
            self.training.queue_no(v.key)
        return v.key

    def learn_imported(self, indices):
        """Labels just imported: queued for the next updates, as new answers the reward model has not seen."""
        for index in indices:
            self.training.rm_fitted.discard(index)
            self.visit(index)

    def visit(self, index):
        """Queue an image for training in this epoch (see TrainingQueue.visit)."""
        self.training.visit(index, self.answer_of.get(index, SKIP) is not SKIP, self.ledger.no_keys(index))

    def undo(self, index):
        """Take back the answer about image `index`: it leaves the queues and the epoch's rewards, and is
        handed out again. True when the reward model had been fitted on it (then call refit_reward_model)."""
        if index in self.ledger.rechecks:
            return undo_recheck(self, index)
        with self.lock:
            gone = self.ledger.undo_answer(index)
            self.questions.outstanding.add(index)
        self.asked_this_run -= 1
        self.shown_of.pop(index, None)
        fitted = self.training.forget_answer(index)
        return fitted and gone is not None and gone.answer is not SKIP and not self.cfg.no_reward_model

    def undo_verdict(self, row):
        """Take back the verdict with store id `row`: its image is handed out again. True when the reward model
        had been fitted on it (then call refit_reward_model)."""
        with self.lock:
            v = self.ledger.undo_verdict(self.ledger.verdict_by_row(row).key)
            self.questions.take(v.image)
            self.questions.outstanding.add(v.image)
        self.asked_this_run -= 1
        return self.training.forget_verdict(v, v.image in self.answer_of) and not self.cfg.no_reward_model

    def refit_reward_model(self):
        """A few reward-model steps on the answers it was fitted on, after one of them was undone."""
        refit_reward_model(self)

    # --- updates ------------------------------------------------------------------------------
    def update_due(self):
        return self.training.waiting() >= self.cfg.answers_per_update()

    def update(self, rm_only=False):
        """One update on the pending answers and verdicts plus some unanswered images; writes metrics and
        checkpoint."""
        self.observer.update_started(self.learner.version + 1)
        t0 = time.perf_counter()
        new, nos, take = self.training.take(self.cfg.answers_per_update(), rm_only,
                                            self.cfg.unanswered_batch if rm_only else self.cfg.rm_per_update)
        ledger = self.ledger
        replay, no_replay = self.training.replay(
            new, nos, lambda i: self.answer_of.get(i, SKIP) is not SKIP, lambda k: ledger.verdicts[k] is not None,
            self.learner.rm_cfg.rm_batch_size - len(new) - len(nos))
        fresh, fresh_verdicts = self.training.fresh(new, nos, ledger)
        shown = shown_rewards(self, new, fresh, fresh_verdicts)
        stats = score_fresh_verdicts(self, fresh_verdicts)
        batch = update_batch(self, new, replay, take, fresh, nos, no_replay)
        stats.update(self.learner.update(batch))
        self.rechecks.note_fresh(new, fresh, batch.answers_new, self.learner)
        self.training.fitted(new, nos)
        return self.after_update(stats, len(new), len(nos), shown, t0)

    def labels(self, indices):
        return torch.tensor([self.answer_of[i] for i in indices], dtype=torch.long)

    def after_update(self, stats, n_labels, n_no, shown, t0):
        """Metrics (printed and in metrics.jsonl), validation, checkpoint and a new ranking."""
        metrics = update_metrics(self, stats, n_labels, n_no, shown, t0)
        if self.val is not None and self.cfg.val_every and self.learner.version % self.cfg.val_every == 0:
            metrics["val_acc"] = accuracy_on(self.learner, self.val, self.cfg.score_batch)
        metrics.update(self.rechecks.plan(self))
        self.files.write_metrics(metrics)
        every = self.cfg.checkpoint_every and self.learner.version % self.cfg.checkpoint_every == 0
        if every or time.monotonic() - self.saved_at >= self.cfg.checkpoint_seconds:
            self.save()
        self.refresh_ranking()
        self.observer.update_done(metrics)
        return metrics

    def finish_epoch(self, stop=lambda: False):
        """Visit the images this epoch has not (training when due), train on the leftover answers and the
        unanswered images, then end the epoch: metrics, export, checkpoint. False when `stop()` came first."""
        for index in self.questions.order:
            if stop():
                return False
            self.visit(index)
            if self.update_due():
                self.update()
        while self.training.waiting() or (self.training.unanswered and self.reward_model_ready()):
            if stop():
                return False
            self.update(rm_only=not self.training.waiting())
        remeasure_reward_model(self)
        recompute_batchnorm(self)
        self.episodes.append(self.training.episode(self.epoch + 1))
        self.epoch += 1
        if self.val is not None:
            self.files.write_metrics({"update": self.learner.version, "epoch": self.epoch, "epoch_end": True,
                                      "answers": len(self.ledger.labelled()), "imported": self.ledger.imported_count(),
                                      "val_acc": accuracy_on(self.learner, self.val, self.cfg.score_batch)})
        if self.store is not None:
            self.files.write_training_data(self.episodes, self.store.rows(), self.ds.class_names)
        self.save()
        self.begin_epoch()
        return True

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self):
        self.saved_at, self.saved_state = time.monotonic(), (self.learner.version, self.epoch)
        if self.ranks.is_main:
            self.files.save_checkpoint(checkpoint_of(self), self.cache)

    def save_if_changed(self):
        """The checkpoint, unless the last one written holds this very state (the epoch end just wrote it)."""
        if self.saved_state != (self.learner.version, self.epoch):
            recompute_batchnorm(self)  # a session that ends mid-epoch: the model taken home
            self.save()

    def restore(self, ckpt):
        """Continue from a checkpoint (and the run's reference policy)."""
        self.learner.load_state_dict(ckpt)
        reference = self.files.load_reference()
        if reference is not None:
            self.learner.reference.load_state_dict(reference)
        self.epoch = int(ckpt["epoch"])
        self.episodes = list(ckpt.get("episodes", []))
        if "rm_fitted" in ckpt:  # format 1 checkpoints were written after every update: all answers fitted
            self.training.restore_fitted(ckpt["rm_fitted"], ckpt["no_fitted"], self.ds.hashes, self.ledger)
        self.begin_epoch()


def ranked_questions(run):
    """The unasked images in the order to ask them: --cover-first's covering head, then the uncertainty ranking
    (not before the first update: the models have learnt nothing yet)."""
    with run.lock:
        unasked = list(run.questions.unasked)
        asked = set(run.ledger.verdict_keys) | set(run.answer_of) | set(run.questions.outstanding)
    ranking = [] if run.coverage is None else run.coverage.first(asked, unasked)
    if run.learner.version > 0:
        ranking += run.rank_questions(unasked, run.questions.rank_rng)
    return ranking


def with_neighbours(run, index, probs):
    """The guess `probs` for image `index` times what its nearest answered images say (--neighbour-prior)."""
    if run.neighbours is None:
        return probs
    return run.neighbours.times(probs, index, answered_labels(run))


def answered_labels(run):
    with run.lock:
        return {i: c for i, c in run.answer_of.items() if c is not SKIP}


def neighbour_priors(run, images):
    """(N, K) what look-alike answered images say of unanswered pool images, or None (--neighbour-targets false,
    --neighbour-prior none, label runs)."""
    if run.neighbours is None or not images or not run.cfg.neighbour_targets:
        return None
    return run.neighbours.priors(list(images), answered_labels(run))


def shown_rewards(run, new, fresh, fresh_verdicts):
    """The rewards of what the person was shown: +1/-1 for each fresh answer's guess, and for each fresh verdict."""
    shown = [1.0 if run.shown_of[i] == run.answer_of[i] else -1.0
             for i, f in zip(new, fresh) if f and i in run.shown_of]
    return shown + [1.0 if run.ledger.verdicts[k].verdict else -1.0 for k in fresh_verdicts]


def known_scores(run, new):
    """UpdateBatch's policy_probs_new and rm_rewards_new: what the guesses and the ranking said of the new answers'
    images, where the models have not changed since (None where any is missing)."""
    stamp = run.learner.changes
    return {"policy_probs_new": run.scores.policy_probs(stamp, new), "rm_rewards_new": run.scores.rewards(stamp, new)}


def score_fresh_verdicts(run, keys):
    """{"rm_verdict_acc": the reward model's score on the fresh verdicts (ledger keys)}, before it learns them."""
    if not keys:
        return {}
    vs = [run.ledger.verdicts[k] for k in keys]
    images = [v.image for v in vs]
    return {"rm_verdict_acc": run.learner.score_verdicts(
        run.inputs(images), torch.tensor([v.proposed for v in vs]), torch.tensor([v.verdict for v in vs]),
        torch.tensor([v.behaviour for v in vs]), run.scores.rewards(run.learner.changes, images))}


def record_recheck(run, index, answer):
    """RLHFRun.record of an image asked again: a changed answer replaces the label and is learnt again."""
    with run.lock:
        run.questions.outstanding.discard(index)
        kind = run.ledger.add_recheck(index, answer)
    run.asked_this_run += 1
    if kind == RECHECK:
        learn_again(run, index)


def undo_recheck(run, index):
    """RLHFRun.undo of a recheck's answer: the earlier answer stands again, and the image is asked again."""
    with run.lock:
        run.ledger.undo_recheck(index)
        run.rechecks.undone(run, index)
    run.asked_this_run -= 1
    learn_again(run, index)
    return False


def learn_again(run, index):
    """An image whose label a recheck changed (or its undo changed back): queued again, and new to the reward
    model, so it learns the class the image has now."""
    run.training.forget(index, unanswered=False)
    run.training.rm_fitted.discard(index)
    run.visit(index)


def refit_reward_model(run):
    """RLHFRun.refit_reward_model: a minibatch of the answers the reward model was fitted on, learnt again."""
    fitted = sorted(i for i in run.training.rm_fitted if run.answer_of.get(i, SKIP) is not SKIP)
    if not fitted:
        return
    pick = run.training.rng.sample(fitted, min(len(fitted), run.learner.rm_cfg.rm_batch_size))
    run.observer.update_started(None)
    run.learner.fit_reward_model(run.inputs(pick), run.labels(pick))
    run.observer.update_done(None)


def update_metrics(run, stats, n_labels, n_no, shown, t0):
    """The metrics of an update: counts of answers and verdicts, the learner's statistics, the mean reward."""
    ledger = run.ledger
    metrics = {"update": run.learner.version, "epoch": run.epoch + 1, "answers": len(ledger.labelled()),
               "imported": ledger.imported_count(), "asked": len(ledger.label_of),
               "asked_this_run": run.asked_this_run, "human_images": n_labels, **stats,
               "update_s": time.perf_counter() - t0}
    if run.rechecks.fraction:
        metrics.update(rechecks=ledger.recheck_total, recheck_changed=ledger.kinds[RECHECK])
    if run.cfg.ask == "verdict" or ledger.nos:
        live = ledger.live_verdicts()
        metrics.update(verdicts=len(live), verdict_no_updated=n_no,
                       yes_share=sum(v.verdict for v in live) / len(live) if live else 0.0)
        if run.posterior_mode():
            metrics["flip_rate"] = run.learner.flip_rate()
    if shown:
        metrics["mean_reward"] = sum(shown) / len(shown)  # of what the person was shown
    return metrics


def answer_row(run, index, answer, probs, policy_version):
    """The store row of an answer: the guess shown (argmax of probs), its probability, the answer and the
    reward of the shown guess (+1 right, -1 wrong, None for a skip)."""
    shown = None if probs is None else int(probs.argmax())  # None: given before the model was ready
    kind = "skip" if answer is SKIP else "correction" if run.cfg.ask == "verdict" else "label"
    return dict(sha1=run.ds.hash_of(index), path=run.ds.paths[index], answer=answer, predicted=shown,
                probability=None if shown is None else float(probs[shown]),
                reward=None if answer is SKIP or shown is None else (1.0 if shown == answer else -1.0),
                policy_version=policy_version, epoch=run.epoch, kind=kind)


def verdict_row(run, index, proposed, behaviour, verdict, policy_version):
    """The store row of a verdict (FeedbackStore.add_verdict's arguments)."""
    return dict(sha1=run.ds.hash_of(index), path=run.ds.paths[index], proposed=proposed, behaviour_prob=behaviour,
                verdict=verdict, rule=run.cfg.propose, policy_version=policy_version, epoch=run.epoch)


def link_stored(run, pairs):
    """Give pool positions (index, content hash) what the store holds about their pictures. The reward model
    counts as fitted on them (only answers given later measure it) unless the checkpoint says it was not."""
    answered, verdicts = run.stored.link(run.ledger, pairs, run.questions.outstanding)
    for v in verdicts:
        if not v.verdict and run.training.counts_as_fitted(row=v.row):
            run.training.no_fitted.add(v.key)
    for i in answered:
        if run.answer_of.get(i, SKIP) is not SKIP and run.training.counts_as_fitted(sha1=run.ds.hashes[i]):
            run.training.rm_fitted.add(i)
        if i in run.answer_of:
            run.questions.take(i)


def update_batch(run, new, replay, take, fresh, nos, no_replay):
    """The UpdateBatch of one update: new and replayed answers (pool images), unanswered images to learn from the
    reward model (when ready), the fresh ones among the new, and verdicts "no" (ledger keys) new and replayed."""
    ledger = run.ledger
    batch = UpdateBatch(run.inputs(new), run.labels(new), torch.tensor(fresh, dtype=torch.bool), run.inputs(replay),
                        run.labels(replay), **known_scores(run, new))
    batch.x_unanswered = run.inputs(take) if (take and run.reward_model_ready()) else None
    batch.no = verdict_batch(run, nos, no_replay)
    if run.posterior_mode() and ledger.verdicts:
        add_evidence(batch, ledger, new, replay)
    batch.images = {"new": new, "replay": replay, "unanswered": take, "no": [ledger.verdicts[k].image for k in nos]}
    if batch.x_unanswered is not None:
        batch.prior_unanswered = neighbour_priors(run, take)
    return batch


def verdict_batch(run, nos, no_replay):
    """The VerdictBatch of verdicts "no" (ledger keys) to learn from and to replay, or None."""
    if not nos and not no_replay:
        return None
    new, old = [run.ledger.verdicts[k] for k in nos], [run.ledger.verdicts[k] for k in no_replay]
    return VerdictBatch(run.inputs([v.image for v in new]), torch.tensor([v.proposed for v in new], dtype=torch.long),
                        torch.tensor([v.behaviour for v in new], dtype=torch.float64),
                        run.inputs([v.image for v in old]), torch.tensor([v.proposed for v in old], dtype=torch.long),
                        evidence_of(run.ledger, [v.image for v in new]))


def add_evidence(batch, ledger, new, replay):
    """Mark the new and replayed answers that came from verdicts, with their images' evidence: they are learnt
    as verdicts (a bounded reward-model loss, the posterior as the policy's target), not as labels."""
    from_verdicts = (VERDICT_YES, IMPLIED)  # a yes, or the last class left after the no's
    batch.yes_new = torch.tensor([ledger.kind_of.get(i) in from_verdicts for i in new], dtype=torch.bool)
    batch.yes_replay = torch.tensor([ledger.kind_of.get(i) in from_verdicts for i in replay], dtype=torch.bool)
    batch.evidence_new, batch.evidence_replay = evidence_of(ledger, new), evidence_of(ledger, replay)


def evidence_of(ledger, images):
    """(N, K) yes minus no per class of each image's verdicts (N may be 0)."""
    return torch.tensor([ledger.net_verdicts(i) for i in images], dtype=torch.float32).reshape(
        len(images), ledger.num_classes)


def ask_again(run, index):
    """After a verdict: put image `index` back among this epoch's questions while it is not settled. Hard
    verdicts: until a yes or the last class left. Posterior: until its posterior gives one class
    --verdict-confidence, or it had --verdicts-per-image verdicts; an image with a yes is then asked to confirm,
    one with no's alone asked next (--reask now) or when its turn comes (later)."""
    ledger, questions, cfg = run.ledger, run.questions, run.cfg
    if not run.posterior_mode():
        if index not in run.answer_of and len(ledger.allowed(index)) > 1:
            questions.put_back(index, follow_up=cfg.reask == "now")
        return
    questions.confirm.discard(index)
    prior = run.prior_of.get(index) or [1.0] * ledger.num_classes
    sure = max(posterior(prior, ledger.net_verdicts(index), run.learner.flip_rate())) >= cfg.verdict_confidence
    if sure or ledger.verdict_count(index) >= cfg.verdicts_per_image:
        return
    if index in run.answer_of:
        questions.confirm.add(index)
    # a no alone: its next likeliest class, before any other image (a yes waits its turn to be confirmed)
    questions.put_back(index, follow_up=cfg.reask == "now" and index not in run.answer_of)


def remeasure_reward_model(run):
    """--ask verdict: measure the reward model again at an epoch end, by two half-data fits scoring each other's
    half (crossfit_trust.py); the records it leaves are what its trust is read from until fresh answers come."""
    if run.cfg.ask != "verdict" or run.cfg.no_reward_model or not run.posterior_mode():
        return
    rows = ledger_rows(run.ledger)
    if rows == run.remeasured:
        return  # nothing said since the last re-measure: fitting the same rows again would only redraw its noise
    run.remeasured = rows
    rng = random.Random(f"{run.cfg.seed}:crossfit:{run.epoch}")
    if len(rows) > CROSSFIT_ROWS:
        rows = rng.sample(rows, CROSSFIT_ROWS)
    halves = [CrossfitHalf.of_rows(run.inputs, h) for h in halves_by_image(rows, rng)]
    records = crossfit_records(run.learner, halves, seed=run.cfg.seed + run.epoch)
    if records is not None:
        run.learner.rm_record, run.learner.verdict_record = records[0] or run.learner.rm_record, records[1]


def recompute_batchnorm(run, sample=BN_SAMPLE):
    """The models' BatchNorm statistics recomputed over a seeded sample of the pool's readable images."""
    if not run.learner.has_batchnorm():
        return
    readable = [i for i in range(len(run.ds)) if i not in run.ds.unreadable]
    pick = sorted(random.Random(f"{run.cfg.seed}:bn:{run.epoch}").sample(readable, min(sample, len(readable))))
    size = run.cfg.score_batch
    run.learner.recompute_batchnorm(run.inputs(pick[s:s + size]) for s in range(0, len(pick), size))


def accuracy_on(learner, val, batch_size):
    """Accuracy of the policy on the --val images (split across processes under torchrun)."""
    keep = [i for i in range(len(val)) if i not in val.unreadable]  # files that are no images
    starts = range(0, len(keep), batch_size)
    return evaluate_accuracy(learner.image_probs, (val.batch(keep[s:s + batch_size]) for s in starts),
                             (torch.tensor([val.labels[i] for i in keep[s:s + batch_size]]) for s in starts))


def checkpoint_of(run):
    """The checkpoint dict of a run: everything to rebuild and resume it (nanoGPT style)."""
    ledger, training = run.ledger, run.training
    return {"format_version": FORMAT_VERSION, **run.learner.state_dict(),
            "class_names": list(run.ds.class_names), "image_size": run.ds.image_size,
            "normalization": {"mean": list(run.ds.mean), "std": list(run.ds.std)},
            "weights_origin": run.weights_origin, "arch": "resnet18", "finetune": run.learner.finetune,
            "epoch": run.epoch, "step": run.learner.version, "episodes": run.episodes, "config": run.cfg.to_flat(),
            # what the reward model has learnt: answers given after this checkpoint are fresh on resume
            "rm_fitted": sorted(run.ds.hash_of(i) for i in training.rm_fitted),
            "no_fitted": sorted(ledger.verdicts[k].row for k in training.no_fitted if ledger.verdicts[k] is not None)}


class StoredRows:
    """What the store holds, by content hash, linked to pool positions as their hashes become known (a new
    folder's are read in the background, see dataset.py)."""

    def __init__(self, answers, imported, verdicts, rechecks=()):
        self.answers, self.imported = answers, imported  # {sha1: class or SKIP}, hashes of imported labels
        self.verdicts, self.rechecks = {}, {}
        for row in verdicts:
            self.verdicts.setdefault(row["sha1"], []).append(row)
        for row in rechecks:
            self.rechecks.setdefault(row["sha1"], []).append(row)

    @staticmethod
    def read(store):
        """What StoredRows is made of, read from the store (or nothing, on a process that holds none)."""
        if store is None:
            return {}, set(), [], []
        return store.answers(), store.imported(), store.verdicts(), store.rechecks()

    def __bool__(self):
        return bool(self.answers or self.verdicts)

    def link(self, ledger, pairs, outstanding):
        """Add to the ledger what the store holds of these (position, hash) pairs: answers, then verdicts in
        the order given (each verdict to one position per picture). Returns (positions answered, Verdicts)."""
        answered, rows = [], []
        for i, h in pairs:
            if i in ledger.label_of or i in outstanding:  # asked again in this session already
                continue
            if h in self.answers:
                ledger.add_answer(i, self.answers[h], "import" if h in self.imported else "label")
                for row in self.rechecks.pop(h, ()):
                    if row["answer"] is SKIP or 0 <= row["answer"] < ledger.num_classes:
                        ledger.add_recheck(i, row["answer"], row["id"])
                answered.append(i)
            rows += [(row, i) for row in self.verdicts.pop(h, ())]
        added = []
        for row, i in sorted(rows, key=lambda t: t[0]["id"]):
            added.append(ledger.add_verdict(i, row["proposed"], row["behaviour_prob"], row["verdict"],
                                            row["policy_version"], row["id"]))
            answered.append(i)
        return answered, added


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
        if ckpt.get("image_size", ds.image_size) != ds.image_size:  # another run's file put in this folder
            raise CheckpointError(f"{ckpt_path} was trained on {ckpt.get('image_size')} px images, not "
                                  f"{ds.image_size}: put back this run's checkpoint.pt or start a new --out")
        run.restore(ckpt)
    if report:
        run.learn_imported(sorted(i for i, _ in report.added.values()))
        run.log(report.line(ds.root))
    run.files.save_reference(learner.reference.state_dict())
    run.files.write_config(cfg.to_flat())
    return run


def take_early_answer(run, index, sha1, answer=SKIP, proposed=-1, verdict=None, row=None):
    """An answer given in the window before the run was ready (first_images.py), already in the store: recorded
    as a fresh one (queued, the reward model not fitted on it), whether or not the run read it when it opened."""
    if verdict is None:
        with run.lock:
            run.stored.answers.pop(sha1, None)  # a hash read later must not link it a second time
            linked = index in run.answer_of
        if not linked:
            return run.record(index, answer, None, 0)
    else:
        with run.lock:
            run.stored.verdicts[sha1] = [r for r in run.stored.verdicts.get(sha1, ()) if r["id"] != row]
            linked = next((v for v in run.ledger.verdicts if v and v.row == row), None)
        if linked is None:
            return run.record_verdict(index, proposed, 1.0 / run.ds.num_classes, verdict, 0, row)
        if not verdict:
            run.training.no_fitted.discard(linked.key)
            return run.training.queue_no(linked.key)
    if run.answer_of.get(index, SKIP) is not SKIP:  # read from the store when the run opened: queued as new
        run.learn_imported([index])


def give_answer(run, index, answer, probs):
    """A simulated person's answer: committed to the store (on the process that holds it), then recorded."""
    if run.store is not None and index in run.rechecks.handed:
        run.store.add_recheck(**recheck_row(run, index, answer, run.learner.version))
    elif run.store is not None:
        run.store.add(**answer_row(run, index, answer, probs, run.learner.version))
    run.record(index, answer, probs, run.learner.version)


def give_verdict(run, index, proposed, behaviour, verdict):
    """A simulated person's verdict: committed to the store (on the process that holds it), then recorded."""
    row = None
    if run.store is not None:
        row = run.store.add_verdict(**verdict_row(run, index, proposed, behaviour, verdict, run.learner.version))
    return run.record_verdict(index, proposed, behaviour, verdict, run.learner.version, row)


def run_headless(run, labeler, stop=lambda: False):
    """The loop with a simulated person, until cfg.epochs or until `stop()` (checked between updates):
    each round asks the questions one update needs, guessed in one batch; under torchrun each process
    asks the labeler about its block of them and the answers are shared. False when stopped early."""
    while run.epoch < run.cfg.epochs:
        run.refresh_ranking()
        while not stop() and (asks := run.next_questions(max(1, run.cfg.answers_per_update()
                                                                 - run.training.waiting()))):
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
    ledger = run.ledger
    asked = [len(ledger.verdict_keys.get(i, ())) + (i in ledger.answers) + len(ledger.rechecks.get(i, ()))
             for i in asks]  # before
    if proposals is None:
        mine = [labeler.answer(asks[j], asked[j]) for j in range(start, end)]
    else:
        mine = [labeler.verdict(asks[j], proposals[j][0], asked[j]) for j in range(start, end)]
    answers = [a for block in run.ranks.gather(mine) for a in block]
    for j, (index, answer, p) in enumerate(zip(asks, answers, probs)):
        if proposals is None or answer is None:  # an answer, or a skip of either kind
            give_answer(run, index, answer, p)
        else:
            give_verdict(run, index, *proposals[j], answer)
