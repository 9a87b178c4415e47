"""The labeling window's two worker threads, which never touch a widget (feedback_gui.py owns the window).

  Guesser  hands out the run's next questions (RLHFRun.next_question) and prepares LOOKAHEAD of them: the
           guess of a snapshot of the policy (its version is stored with the answer) and the picture
           decoded and fitted, so that a key never waits for either, nor for an update.
  RunWorker  drives the RLHFRun: records the answers and undos in order (committed to the store by the
           window already), and runs every update and epoch end, however far behind the person it falls.
Both report to the window through its outbox queue, in the typed messages of window_messages.py.
"""
import copy
import os
import queue
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
from PIL import Image

import window_messages as msg
from display import fit, load_picture
from rlhf_run import NullObserver

LOOKAHEAD = 8       # questions ready beyond the one shown, so a fast labeler never waits for a guess


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
    version: int
    picture: object
    fitted: object
    box: tuple
    problem: str = ""
    proposed: int = -1       # --ask verdict: the class put to the person, and the probability the rule gave it
    behaviour: float = 1.0
    earlier: object = None   # --recheck: the class the person gave before, when the image is asked again


def failure(what, err):
    traceback.print_exc()
    return f"{what} stopped: {type(err).__name__}: {err}"


class Guesser(threading.Thread):
    """Hands out the run's questions and prepares them, never more than LOOKAHEAD beyond the one shown.
    Every question falls in the session's first epoch: after it, every image is answered or
    --max-answers is reached."""

    def __init__(self, run, outbox, screen):
        super().__init__(name="rlhf-guesser", daemon=True)
        self.rlhf, self.ds, self.outbox, self.screen = run, run.ds, outbox, screen
        self.epoch, self.asked_before, self.total = run.epoch, len(run.answer_of), run.questions_left()
        self.snapshot = self.copy_policy()  # replaced whole by the run worker after each update
        self.box, self.shown, self.stopping = (720, 480), 0, False
        self.cond = threading.Condition()

    def copy_policy(self):
        """(frozen copy of the current policy, its version): what the next questions are guessed with."""
        policy = copy.deepcopy(self.rlhf.learner.policy).eval().requires_grad_(False)
        return policy, self.rlhf.learner.version

    def tell(self, **state):
        """shown=seq (the window shows it) or stopping=True."""
        with self.cond:
            for name, value in state.items():
                setattr(self, name, value)
            self.cond.notify()

    def run(self):
        try:
            seq = 0
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or seq <= self.shown + LOOKAHEAD)
                    if self.stopping:
                        return
                index = self.rlhf.next_question()
                if index is None:
                    break
                self.outbox.put(msg.QuestionReady(self.prepare(seq, index)))
                seq += 1
            self.outbox.put(msg.NoMoreQuestions())
        except Exception as err:
            self.outbox.put(msg.WorkerFailed(failure("preparing images", err)))

    def prepare(self, seq, index):
        policy, version = self.snapshot
        with torch.inference_mode():
            x = self.ds.batch([index]).to(next(policy.parameters()).device)
            probs = torch.softmax(policy(x).float(), dim=-1)[0].cpu()
        path, box, picture, fitted, problem = self.ds.paths[index], self.box, None, None, ""
        try:
            picture = load_picture(path, self.screen)
            fitted = fit(picture, box)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problem = f"cannot show {os.path.basename(path)} ({err})"
        proposed, behaviour = self.rlhf.propose(index, probs) if self.rlhf.cfg.ask == "verdict" else (-1, 1.0)
        earlier = self.rlhf.answer_of.get(index) if index in self.rlhf.rechecks.handed else None
        left = max(0, self.total - seq)  # rechecks are questions beyond the unasked images counted at the start
        return Question(seq, index, self.epoch, self.asked_before + seq + 1, left, path, probs.numpy(), version,
                        picture, fitted, box, problem, proposed, behaviour, earlier)


class RunWorker(threading.Thread, NullObserver):
    """Drives the RLHFRun for the window: records answers and undos as they come, runs the updates and the
    epoch ends, and tells the window (its outbox) and the guesser (a new policy snapshot) about them."""

    def __init__(self, run, outbox, guesser):
        super().__init__(name="rlhf-run-worker", daemon=True)
        self.rlhf, self.outbox, self.guesser = run, outbox, guesser
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.failed = False  # read by run_session once this thread has ended
        run.observer = self

    def stop(self):
        """Finish the running update, start no other, and end (the caller saves the checkpoint)."""
        self.stopping.set()
        self.inbox.put(msg.Stop())

    def run(self):
        if sys.platform.startswith("linux"):  # this thread alone (a Linux thread id) yields the CPU to keys
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            if self.train():
                self.outbox.put(msg.SessionDone(self.rlhf.learner.version))
        except Exception as err:
            self.failed = True
            self.outbox.put(msg.WorkerFailed(failure("training", err) + ". Every answer given is saved: quit, "
                                         "and continue with --resume once the cause is fixed", stops_training=True))

    def train(self):
        run = self.rlhf
        run.refresh_ranking()  # a resumed run ranks with its trained models
        while run.epoch < run.cfg.epochs:
            while not run.questions_done():  # the answers of this epoch's questions, as they come
                if self.stopping.is_set():
                    return False
                if run.update_due():
                    run.update()
                    self.drain()  # answers and undos that came during the update
                    continue
                try:
                    self.handle(self.inbox.get(timeout=0.5))
                except queue.Empty:
                    pass
            # between the epoch end's updates, undos are still taken
            if not run.finish_epoch(stop=lambda: self.drain() or self.stopping.is_set()):
                return False
            self.outbox.put(msg.EpochDone(run.epoch))
        return True

    def drain(self):
        while True:
            try:
                self.handle(self.inbox.get_nowait())
            except queue.Empty:
                return

    def handle(self, message):
        run = self.rlhf
        if isinstance(message, msg.Answered):
            q = message.question
            run.record(q.index, message.answer, q.probs, q.version)
        elif isinstance(message, msg.VerdictGiven):
            q = message.question
            run.record_verdict(q.index, q.proposed, q.behaviour, message.verdict, q.version, message.row)
        elif isinstance(message, msg.AnswerUndone) and run.undo(message.question.index):
            run.refit_reward_model()
        elif isinstance(message, msg.VerdictUndone) and run.undo_verdict(message.row):
            run.refit_reward_model()
        if not isinstance(message, msg.Stop):
            self.outbox.put(msg.Waiting(run.training.waiting()))

    # --- what the run tells (NullObserver) ----------------------------------------------------
    def update_started(self, number):
        self.outbox.put(msg.UpdateStarted(number))

    def update_done(self, metrics):
        if metrics is not None:
            self.guesser.snapshot = self.guesser.copy_policy()
        self.outbox.put(msg.UpdateDone(metrics))
        self.outbox.put(msg.Waiting(self.rlhf.training.waiting()))
