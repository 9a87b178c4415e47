"""The labeling window's two worker threads, which never touch a widget (feedback_gui.py owns the window).

  Guesser  picks the next images to ask (as RLHFRun.epoch_visits does) and prepares LOOKAHEAD of them: the
           guess of a snapshot of the policy (its version is stored with the answer) and the picture
           decoded and fitted, so that a key never waits for either, nor for an update.
  Trainer  owns the Learner and the RLHFRun: records the answers in order, visits the images as the
           headless loop does and runs every update, however far behind the person it falls.
Both report to the window through its outbox queue.
"""
import copy
import os
import queue
import random
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
from PIL import Image

from learner import reward_model_update
from rlhf_run import SKIP

LOOKAHEAD = 8       # questions ready beyond the one shown: the guesser needs ~0.1 s for one


@dataclass
class Question:
    """What the window needs to show one image at once; seq numbers the session's questions and pos
    places the image in the pool (the title's 12/245); probs is numpy, picture PIL or None."""
    seq: int
    index: int
    epoch: int
    pos: int
    left: int
    path: str
    probs: object
    sampled: int
    version: int
    picture: object
    fitted: object
    box: tuple
    problem: str = ""


def fit(picture, box):
    """The picture scaled to fit box, aspect ratio kept (small images are enlarged, pixels kept sharp)."""
    w, h = picture.size
    scale = min(box[0] / w, box[1] / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return picture.resize(size, Image.NEAREST if scale >= 3 else Image.BILINEAR)


def load_picture(path, screen):
    """An image decoded for display, at most screen-sized (a JPEG decodes at 1/2..1/8 scale for free)."""
    with Image.open(path) as img:
        img.draft("RGB", screen)
        picture = img.convert("RGB")
    picture.thumbnail(screen)
    return picture


def failure(what, err):
    traceback.print_exc()
    return f"{what} stopped: {type(err).__name__}: {err}"


class Guesser(threading.Thread):
    """Picks the images to ask about, as run.epoch_visits does, and prepares them as questions, never
    more than LOOKAHEAD beyond the one shown. Every question falls in the session's first epoch: after
    it, every image is answered or --max-answers is reached."""

    def __init__(self, run, outbox, trainer_inbox, policy, version, screen):
        super().__init__(name="rlhf-guesser", daemon=True)
        self.ds, self.outbox, self.trainer_inbox, self.screen = run.ds, outbox, trainer_inbox, screen
        self.epoch, self.explore = run.epoch, run.cfg.get("explore", 0.0)
        self.asked = set(run.answer_of)
        self.order = [i for i in run.epoch_order(run.epoch) if i not in self.asked]
        limit = run.cfg.get("max_answers")
        self.total = len(self.order) if limit is None else max(0, min(len(self.order), limit - len(self.asked)))
        # --order uncertain: the trainer ranks the unasked images after each update; None until the first.
        self.ranking = None if run.cfg.get("order") == "uncertain" and self.total else []
        self.snapshot = (policy, version)  # replaced whole by the trainer after each update
        self.rng = random.Random(run.cfg["seed"] * 7919 + run.epoch)
        # Its own generator: which class is sampled must not depend on how far training has got.
        self.generator = torch.Generator().manual_seed(run.cfg["seed"] + 7919)
        self.box, self.shown, self.stopping = (720, 480), 0, False
        self.cond = threading.Condition()

    def tell(self, **state):
        """shown=seq (the window shows it), stopping=True, or ranking=[...] (from the trainer)."""
        with self.cond:
            for name, value in state.items():
                setattr(self, name, value)
            self.cond.notify()

    def next_index(self):
        unasked = [i for i in self.order if i not in self.asked]
        if self.ranking and self.rng.random() < self.explore:
            return self.rng.choice(unasked)  # --explore: a share of the questions picked at random
        ranked = [i for i in self.ranking if i not in self.asked]
        return ranked[0] if ranked else unasked[0]  # a used-up ranking: the epoch's order till the next

    def run(self):
        try:
            for seq in range(self.total):
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or (seq <= self.shown + LOOKAHEAD
                                                                 and self.ranking is not None))
                    if self.stopping:
                        return
                    index = self.next_index()
                    self.asked.add(index)
                self.outbox.put(("question", self.prepare(seq, index)))
            self.outbox.put(("no_more_questions", None))
            self.trainer_inbox.put(("questions_end", self.total))
        except Exception as err:
            self.outbox.put(("error", failure("preparing images", err)))

    def prepare(self, seq, index):
        policy, version = self.snapshot
        with torch.inference_mode():
            x = self.ds.batch([index]).to(next(policy.parameters()).device)
            probs = torch.softmax(policy(x).float(), dim=-1)[0].cpu()
        sampled = int(torch.multinomial(probs, 1, generator=self.generator))
        path, box, picture, fitted, problem = self.ds.paths[index], self.box, None, None, ""
        try:
            picture = load_picture(path, self.screen)
            fitted = fit(picture, box)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problem = f"cannot show {os.path.basename(path)} ({err})"
        pos = len(self.ds) - len(self.order) + seq + 1
        return Question(seq, index, self.epoch, pos, self.total - seq, path, probs.numpy(), sampled, version,
                        picture, fitted, box, problem)


class Trainer(threading.Thread):
    """Owns the Learner and the RLHFRun: records answers in order, visits images, runs the updates."""

    def __init__(self, rlhf, learner, outbox, epochs):
        super().__init__(name="rlhf-trainer", daemon=True)
        self.rlhf, self.learner, self.outbox, self.epochs = rlhf, learner, outbox, epochs
        self.guesser = None
        self.inbox = queue.Queue()
        self.stopping, self.updating = threading.Event(), threading.Event()
        self.given = {}       # seq -> the answer it holds now
        self.index_of = {}    # seq -> pool position
        self.passed = set()   # seqs of the questions the visits have gone past
        self.questions = None  # how many the guesser asks, once it has asked them all
        self.failed = False
        self.rank_rng = random.Random(rlhf.cfg["seed"] * 7919 + rlhf.epoch + 1)

    def stop(self):
        """Finish the running update, start no other, and end (the caller saves the checkpoint)."""
        self.stopping.set()
        self.inbox.put(("stop", None))

    def run(self):
        if sys.platform.startswith("linux"):  # this thread alone (a Linux thread id) yields the CPU to keys
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            if self.train():
                self.outbox.put(("done", self.learner.version))
        except Exception as err:
            self.failed = True
            self.outbox.put(("error", failure("training", err) + ". Every answer given is saved: quit, "
                             "and continue with --resume once the cause is fixed"))

    def train(self):
        run, first = self.rlhf, self.rlhf.epoch
        self.rank()
        for epoch in range(first, self.epochs):
            visits = self.first_epoch() if epoch == first else ((i, None) for i in run.epoch_order(epoch))
            for index, seq in visits:
                self.passed.add(seq)
                if run.visit(index):
                    self.update()
            if not self.finish_epoch():
                return False
        return True

    def first_epoch(self):
        """As run.epoch_visits: the asked images in the order they were asked, then the rest of the pool."""
        run, seq = self.rlhf, 0
        while not self.stopping.is_set():
            while seq not in self.given and self.questions != seq and not self.stopping.is_set():
                self.handle(*self.inbox.get())  # the person has not answered it yet
                if len(run.pending) >= run.cfg["batch_size"]:
                    self.update()  # answers given again after an undo made one due
            self.drain()
            if seq not in self.given:
                break
            yield self.index_of[seq], seq
            seq += 1
        asked = set(self.index_of.values())
        for i in run.epoch_order(run.epoch):
            if i not in asked and not self.stopping.is_set():
                yield i, None

    def finish_epoch(self):
        # run.finish_epoch's updates one at a time, so that a quit need not wait for all of them.
        run = self.rlhf
        while run.pending and not self.stopping.is_set():
            self.update()
        if run.reward_model_ready():
            while run.unanswered and not self.stopping.is_set():
                self.update(rm_only=True)
        if self.stopping.is_set():
            return False
        run.finish_epoch()
        self.outbox.put(("epoch", run.epoch))
        self.drain()
        return True

    def drain(self):
        while True:
            try:
                self.handle(*self.inbox.get_nowait())
            except queue.Empty:
                return

    def handle(self, kind, message):
        run = self.rlhf
        if kind == "questions_end":
            self.questions = message
        elif kind == "answer":
            q, answer = message
            self.given[q.seq], self.index_of[q.seq] = answer, q.index
            run.record(q.index, answer, q.probs, q.sampled, policy_version=q.version, commit=False)
            if q.seq in self.passed:  # answered again after an undo: queue it as its first visit did
                run.visit(q.index)
        elif kind == "undo" and message.seq in self.given:
            q, old = message, self.given.pop(message.seq)
            trained = q.seq in self.passed and q.index not in run.pending
            run.undo(q.index, commit=False)
            if old is not SKIP:
                reward = 1.0 if q.sampled == old else -1.0
                if reward in run.episode_rewards:
                    run.episode_rewards.remove(reward)
                if trained and not run.cfg.get("no_reward_model"):
                    self.refit_reward_model()

    def update(self, rm_only=False):
        if self.stopping.is_set():
            return
        self.updating.set()
        self.outbox.put(("update_started", {"update": self.learner.version + 1}))
        try:
            metrics = self.rlhf.update(rm_only=rm_only)
        finally:
            self.updating.clear()
        policy = copy.deepcopy(self.learner.policy).eval().requires_grad_(False)
        self.guesser.snapshot = (policy, self.learner.version)
        self.outbox.put(("metrics", metrics))
        self.rank()
        self.drain()

    def rank(self):
        """--order uncertain: rank the images still to ask with the current models, for the guesser."""
        g = self.guesser
        if g.ranking is None or g.ranking and self.questions is None:
            with g.cond:
                asked = set(g.asked)
            unasked = [i for i in g.order if i not in asked]
            if unasked:
                g.tell(ranking=self.rlhf.rank_questions(unasked, self.rank_rng))

    def refit_reward_model(self):
        """A few reward-model steps on the answers that remain, after undoing an answer it has learnt."""
        run, lrn = self.rlhf, self.learner
        answered = [i for i, a in run.answer_of.items() if a is not SKIP]
        if not answered or self.stopping.is_set():
            return
        pick = run.rng.sample(answered, min(len(answered), lrn.rm_cfg.rm_batch_size))
        self.updating.set()
        self.outbox.put(("update_started", {"update": None}))
        try:
            reward_model_update(lrn.rm_net, lrn.rm_opt, run.inputs(pick).to(lrn.device),
                                torch.tensor([run.answer_of[i] for i in pick], device=lrn.device),
                                lrn.rm_cfg.rm_steps, lrn.rm_cfg.rm_batch_size, lrn.generator)
        finally:
            self.updating.clear()
        self.outbox.put(("refit", len(answered)))
