"""The labeling window: one Tk root for the whole session, in which a person teaches the model by keyboard.

Three threads; only the Tk thread touches a widget:
  Tk thread  shows the prepared question; commits each answer to SQLite (its own connection, the store's one
             writer) the moment its key is pressed, then hands it to the run worker; drains the outbox with
             after(). What it shows comes from its own AnswerLedger and the workers' messages.
  guesser    (labeling_workers.Guesser) hands out the run's next questions and prepares them ahead.
  run worker (labeling_workers.RunWorker) drives the RLHFRun (rlhf_run.py): answers, undos, every update.
The threads talk in the typed messages of window_messages.py.
RLHF_GUI_EVENTS=FILE appends one JSON line per event (key, shown, update...), for tests and bench/.
"""
import collections
import json
import os
import queue
import signal
import sys
import time
import tkinter as tk
import traceback

import torch
from PIL import ImageTk

import window_messages as msg
from answer_ledger import IMPORT, RECHECK, SKIP, AnswerLedger
from answer_rechecks import recheck_row
from display import fit
from feedback_store import StoreError
from first_images import TITLE, window_size
from labeling_workers import Guesser, RunWorker
from rlhf_run import answer_row, verdict_row
from window_charts import AnswerChart, GuessBars, balance_warning

POLL_MS = 40
POLL_BATCH = 20     # outbox messages handled per tick, so that a burst never holds up a key
RECENT = 20
UNDO_DEPTH = 20     # answers u can take back, each holding its picture
RETRY_MS = 2000     # an answer the store refused (locked by another program, disk full) is tried again


class SessionTally:
    """The person's answers as the window shows them: its own AnswerLedger (by content hash), following each
    answer given or undone, and the record of agreement with the guesses shown."""

    def __init__(self, store, names, asking_verdicts, hash_of):
        rows = store.rows()  # read once: the ledger and the agreement record both come from it
        self.ledger = AnswerLedger.from_store(rows, store.verdicts(), len(names), store.rechecks())
        self.asking_verdicts, self.hash_of = asking_verdicts, hash_of
        self.agree = [r["predicted"] == r["answer"] for r in rows  # no guess: imported, or given before the model
                      if r["answer"] is not None and r.get("kind") != IMPORT and r["predicted"] is not None]

    def apply(self, q, kind, value, ref, sign):
        """An answer (kind label or recheck) or verdict about question q, given (+1) or undone (-1); ref: its
        store id."""
        sha1 = self.hash_of(q.index)
        if kind == "recheck":
            self.ledger.add_recheck(sha1, value, ref) if sign > 0 else self.ledger.undo_recheck(sha1)
            return
        if kind == "verdict":
            if sign > 0:
                self.ledger.add_verdict(sha1, q.proposed, q.behaviour, value, q.version, ref)
            else:
                self.ledger.undo_verdict(self.ledger.verdict_by_row(ref).key)
            return
        if sign > 0:
            self.ledger.add_answer(sha1, value, "correction" if self.asking_verdicts else "label")
        else:
            self.ledger.undo_answer(sha1)
        if value is not SKIP:
            self.agree.append(int(q.probs.argmax()) == value) if sign > 0 else self.agree.pop()

    def counts(self):
        return self.ledger.counts()

    def yes(self):
        """The person's yes (1) and no (0), oldest first."""
        return [v.verdict for v in self.ledger.live_verdicts()]

    def answered(self):
        """The person's labels and corrections (not skips, imports or verdicts)."""
        return self.ledger.kinds["label"] + self.ledger.kinds["correction"] + self.ledger.kinds[RECHECK]

    def line(self, where):
        """The status line's first line: answers, skips, imports, verdicts, `where` in the epoch, agreement."""
        imported, yes = self.ledger.imported_count(), self.yes()
        line = f"{self.answered()} answered · {self.ledger.kinds['skip']} skipped · " + (
            f"{imported} imported · " if imported else "") + where
        if self.asking_verdicts:
            line = f"{len(yes)} verdicts · " + line
        for name, record in (("yes", yes), ("agreement", self.agree)):
            if record and (name == "yes") == self.asking_verdicts:
                recent = record[-RECENT:]
                line += (f"   {name} {sum(recent) / len(recent):.0%} last {len(recent)}"
                         f" · {sum(record) / len(record):.0%} overall")
        return line


class WorkerStatus:
    """What the workers last said (an update running, its metrics, answers waiting, the session's end), and
    the training half of the status line made from it."""

    def __init__(self, epoch):
        self.metrics, self.running, self.waiting, self.epoch = {}, None, 0, epoch
        self.no_more = self.finished = self.failed = False

    def take(self, message):
        """Note a worker's message; returns the event it is logged as (kind, fields)."""
        if isinstance(message, msg.NoMoreQuestions):
            self.no_more = True
            return "no_more_questions", {}
        if isinstance(message, msg.UpdateStarted):
            self.running = message
            return "update_started", {"update": message.number}
        if isinstance(message, msg.UpdateDone):
            self.running, self.metrics = None, message.metrics or self.metrics
            return ("metrics", {"update": message.metrics["update"]}) if message.metrics else ("refit", {})
        if isinstance(message, msg.EpochDone):
            self.epoch = message.epoch
            return "epoch", {"epoch": message.epoch}
        if isinstance(message, msg.WorkerFailed):
            self.running, self.failed = None, self.failed or message.stops_training
            return "error", {"text": message.text}
        self.finished, self.running = True, None  # SessionDone
        return "done", {}

    def training_text(self, batch_size):
        """The last update's figures and what training does now."""
        m, need, running = self.metrics, batch_size - self.waiting, self.running
        kl = (m or {}).get("approx_kl", (m or {}).get("kl_to_optimum", float("nan")))  # PPO's step, or the fit's
        last = (f"update {m['update']}: reward {m.get('mean_reward', float('nan')):+.2f} · "
                f"KL {kl:.4f} · {m.get('update_s', 0):.1f}s" if m else "no update yet")
        now = ("training stopped (see above)" if self.failed else "done" if self.finished
               else f"training update {running.number}…" if running and running.number
               else "refitting the reward model without the undone answer…" if running
               else "training on the answers" if self.no_more
               else f"next update after {need} more answers" if need > 0 else "update due")
        return f"{last}   ·   {now}" + autolabel_text(m or {})


def autolabel_text(m):
    """The status line's estimate of what `--autolabel` could label now (label mode, after a cross-fit)."""
    if "autolabel_unanswered" not in m:
        return ""
    pct = f"{m['autolabel_max_error']:.0%}"
    if "autolabel_covered" in m:
        return (f"\nthe model could label {m['autolabel_covered']:,} of the {m['autolabel_unanswered']:,} unanswered "
                f"at ≤ {pct} error (--export FILE --autolabel {m['autolabel_max_error']})")
    return f"\nauto-labels at ≤ {pct} error need about {m['autolabel_more_answers']:,} more answers"


class ImageView:
    """The picture canvas: the shown question's photo fitted to it (or a line of text), and the next one's
    photo made ahead, so a key only swaps them."""

    def __init__(self, root, box):
        self.box, self.photos, self.on_canvas = box, {}, None
        self.canvas = tk.Canvas(root, width=box[0], height=box[1], bg="#202020", highlightthickness=0)
        self.image_item = self.canvas.create_image(0, 0, anchor="center")
        self.text_item = self.canvas.create_text(0, 0, fill="#dddddd", font=("TkDefaultFont", 14), justify="center")
        self.warmer = tk.Label(root)  # never shown: giving it a photo makes Tk convert the pixels ahead

    def photo(self, q):
        """q's picture as a Tk photo for the current box, converted for the display already."""
        box, photo = self.photos.get(q.seq, (None, None))
        if box != self.box:
            photo = ImageTk.PhotoImage(q.fitted if q.box == self.box else fit(q.picture, self.box))
            self.warmer.configure(image=photo)
            self.photos[q.seq] = (self.box, photo)
        return photo

    def keep(self, shown, following, make=True):
        """Keep the photos of the question shown and the next one (made now, when it has a picture and make)."""
        keep = [q for q in (shown, following) if q and q.picture]
        self.photos = {q.seq: self.photos[q.seq] for q in keep if q.seq in self.photos}
        if len(keep) == 2 and make:
            self.photo(keep[1])

    def show(self, q):
        self.on_canvas = self.photo(q)  # held while shown, whatever keep() lets go
        self.canvas.itemconfigure(self.image_item, image=self.on_canvas, state="normal")
        self.canvas.itemconfigure(self.text_item, state="hidden")

    def say(self, text):
        self.canvas.itemconfigure(self.image_item, state="hidden")
        self.canvas.itemconfigure(self.text_item, state="normal", text=text)

    def fit_to_canvas(self):
        """Take the canvas's size when a resize's event has not come yet; True when the box changed."""
        size = (self.canvas.winfo_width(), self.canvas.winfo_height())
        if min(size) >= 10 and size != self.box:
            self.set_box(*size)
            return True
        return False

    def set_box(self, width, height):
        """The canvas is width x height: pictures are fitted to it from now on."""
        self.box = (width, height)
        for item in (self.image_item, self.text_item):
            self.canvas.coords(item, width // 2, height // 2)
        self.canvas.itemconfigure(self.text_item, width=width - 40)


class LabelingWindow:
    """The Tk side: widgets, keys, the prepared questions and the poll of the workers' outbox."""

    def __init__(self, root, rlhf, store, cfg, guesser, worker, outbox):
        self.root, self.rlhf, self.store, self.cfg = root, rlhf, store, cfg
        self.guesser, self.worker, self.outbox = guesser, worker, outbox
        self.names, self.asking_verdicts = rlhf.ds.class_names, cfg.ask == "verdict"
        self.ready = collections.deque()   # prepared questions not shown yet, in order
        self.current = None
        self.history = collections.deque(maxlen=UNDO_DEPTH)  # (question, kind, answer, row added / row id)
        self.tally = SessionTally(store, self.names, self.asking_verdicts, rlhf.ds.hash_of)
        self.status_text = None
        self.key_t, self.after_id, self.note, self.closing = None, None, None, False
        self.workers = WorkerStatus(rlhf.epoch)  # what the workers last said
        self.signals, self.signum = 0, 0
        self.unsaved = None  # (question seq, answer) that the store refused; retried until it takes it
        path = os.environ.get("RLHF_GUI_EVENTS")
        self.events = open(path, "a", buffering=1, encoding="utf-8") if path else None
        root.title(TITLE)
        width, height = window_size(root)
        root.geometry(f"{width}x{height}")
        root.minsize(min(480, width), min(480, height))
        root.protocol("WM_DELETE_WINDOW", lambda: self.quit("window closed"))
        root.report_callback_exception = self.callback_error
        root.bind("<KeyPress>", self.on_key)
        self.build(width)

    def build(self, width):
        """The widgets, packed from the bottom up (chart, status, keys, class bars, guess, file), the image above."""
        root, verdicts = self.root, self.asking_verdicts
        self.message = tk.Label(root, anchor="w", justify="left", padx=10, pady=6, fg="white", wraplength=920)
        chart = tk.Canvas(root, height=96, bg="white", highlightthickness=0)
        self.answer_chart = AnswerChart(chart, self.names, verdicts, RECENT)
        self.status = tk.Label(root, anchor="w", justify="left", padx=10, font=("TkFixedFont", 10))
        keys = self.build_keys()
        bars = tk.Canvas(root, highlightthickness=0)
        guess = tk.Label(root, anchor="w", padx=10, font=("TkDefaultFont", 22 if verdicts else 11,
                                                          "bold" if verdicts else "normal"))
        self.guess_bars = GuessBars(bars, guess, self.names, self.cfg.blind, verdicts)
        self.guess_bars.resize(width)
        self.file = tk.Label(root, anchor="w", padx=10, font=("TkDefaultFont", 12, "bold"))
        for w in (chart, self.status, keys, bars, guess, self.file):
            w.pack(side="bottom", fill="x", pady=2)
        self.view = ImageView(root, self.guesser.box)
        self.view.canvas.pack(side="top", fill="both", expand=True)
        self.view.canvas.bind("<Configure>", self.on_resize)

    def build_keys(self):
        """A frame of buttons, one per key, eight to a row."""
        keys = tk.Frame(self.root)
        self.buttons = [tk.Button(keys, text=f"{c}  {name}", command=lambda c=c: self.answer(c))
                        for c, name in enumerate(self.names)]
        if self.asking_verdicts:
            self.buttons = [tk.Button(keys, text="y  yes", command=lambda: self.verdict(1)),
                            tk.Button(keys, text="n  no", command=lambda: self.verdict(0))] + self.buttons
        self.buttons += [tk.Button(keys, text="s  skip", command=lambda: self.answer(SKIP)),
                         tk.Button(keys, text="u  undo", command=self.undo),
                         tk.Button(keys, text="q  quit", command=lambda: self.quit("quit button"))]
        for i, b in enumerate(self.buttons):
            b.grid(row=i // 8, column=i % 8, padx=3, pady=3, sticky="ew")
        return keys

    def say(self, text, kind="note"):
        """The message bar: errors (red) stay; notes (blue) and retries (red) go with the next saved answer."""
        if not text:
            if self.note in ("note", "retry"):
                self.message.pack_forget()
                self.note = None
            return
        self.note = kind
        colour = {"error": "#b00020", "retry": "#b00020", "done": "#1b5e20"}.get(kind, "#0d47a1")
        self.message.configure(text=text, bg=colour)
        self.message.pack(side="top", fill="x", before=self.view.canvas)

    def callback_error(self, exc, value, tb):
        traceback.print_exception(exc, value, tb)
        self.say(f"window error: {exc.__name__}: {value} (every answer is saved; details on the console)", "error")

    def log(self, kind, **fields):
        if self.events:
            self.events.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")

    # --- showing ----------------------------------------------------------------------------
    def warm_next(self):
        # While the person looks at this image, the next one's photo is made, so a key only swaps them.
        self.view.keep(self.current, self.ready[0] if self.ready else None, make=not self.closing)

    def show(self):
        q, w = self.current, self.workers
        # The progress widgets are drawn a moment later, once the image has gone to the display.
        self.root.after(1, self.after_show)
        if q is None:
            self.view.say("Session complete: every epoch is done and the checkpoint saved.\nClose the window (q)."
                          if w.finished else "No more questions in this run: training goes on over the answers.\n"
                          "Quit (q) at any time; --resume continues." if w.no_more else "preparing the next image…")
            self.root.title(f"{TITLE}  {'done' if w.finished else 'training' if w.no_more else 'preparing'}")
            self.file.configure(text="")
            self.guess_bars.clear()
            return
        self.guesser.tell(shown=q.seq)
        if self.view.fit_to_canvas():  # a resize whose event has not come yet: fit what is there
            self.guesser.box = self.view.box
        if q.picture is None:
            self.view.say(q.problem + "\nanswer from the file name, or skip (s)")
            self.say(q.problem)
        else:
            self.view.show(q)
        if q.earlier is not None:
            self.say(f"you said {self.names[q.earlier]}: look again? Press {q.earlier} to keep it, or the right "
                     "class's key")
        title = f"{TITLE}  {q.pos}/{len(self.rlhf.ds)}  {os.path.basename(q.path)}"
        self.root.title(title)
        self.file.configure(text=os.path.relpath(q.path, self.rlhf.ds.root))
        self.guess_bars.draw(q, self.tally.counts())
        key_t, self.key_t = self.key_t, None
        if self.events:  # after_idle runs after Tk's own redraws: "shown" is logged once the image is drawn
            counts = list(self.tally.counts())
            self.root.after_idle(lambda: self.log("shown", seq=q.seq, path=q.path, title=title, key_t=key_t,
                                                  proposed=q.proposed, counts=counts, box=self.view.box,
                                                  earlier=q.earlier))

    def after_show(self):
        self.status_line()
        self.answer_chart.draw(self.tally.yes() if self.asking_verdicts else self.tally.agree, self.tally.counts())
        self.warm_next()

    def on_resize(self, event):
        if event.width < 10 or event.height < 10:
            return
        self.view.set_box(event.width, event.height)
        self.guesser.box = self.view.box
        if self.current is not None and self.current.picture is not None:
            self.view.show(self.current)

    # --- keys -------------------------------------------------------------------------------
    def on_key(self, event):
        key, t = event.keysym, time.time()
        self.log("key", t=t, key=key, xtime=event.time)  # xtime: when the X server made the event, in ms
        if key.isdigit() and int(key) < len(self.names):
            self.answer(int(key), t)
        elif key in ("y", "Y", "n", "N") and self.asking_verdicts:
            self.verdict(int(key in ("y", "Y")), t)
        elif key in ("s", "S"):
            self.answer(SKIP, t)
        elif key in ("u", "U", "BackSpace"):
            self.undo()
        elif key in ("c", "C"):
            self.log("chart", view=self.answer_chart.toggle())
        elif key in ("q", "Q", "Escape"):
            self.quit(f"key {key}")

    def answer(self, answer, t=None):
        """A class (or SKIP) for the image shown: committed at once, then passed to the run worker."""
        q = self.current
        if q is None or self.closing:
            return
        if q.earlier is not None:  # an answer asked again: the earlier row stays, this one is added
            row = {**recheck_row(self.rlhf, q.index, answer, q.version), "earlier": q.earlier, "epoch": q.epoch}
            self.commit(q, "recheck", answer, lambda: self.store.add_recheck(**row),
                        lambda ref: msg.Answered(q, answer), t)
            return
        row = {**answer_row(self.rlhf, q.index, answer, q.probs, q.version), "epoch": q.epoch}
        self.commit(q, "label", answer, lambda: self.store.add(**row), lambda added: msg.Answered(q, answer), t)

    def verdict(self, verdict, t=None):
        """Yes (1) or no (0) to the class proposed for the image shown (--ask verdict)."""
        q = self.current
        if q is None or self.closing:
            return
        row = {**verdict_row(self.rlhf, q.index, q.proposed, q.behaviour, verdict, q.version), "epoch": q.epoch}
        self.commit(q, "verdict", verdict, lambda: self.store.add_verdict(**row),
                    lambda ref: msg.VerdictGiven(q, verdict, ref), t)

    def commit(self, q, kind, value, write, message, t):
        """Write to the store before anything else (a kill from here on loses nothing), then move on."""
        try:
            ref = write()
        except StoreError as err:  # nothing written: the image stays, the answer is tried again (a new key wins)
            self.unsaved = (q.seq, kind, value)
            self.say(f"not saved yet, trying again every {RETRY_MS // 1000} s: {err}", "retry")
            again = self.verdict if kind == "verdict" else self.answer
            self.root.after(RETRY_MS, lambda: self.current is q and self.unsaved == (q.seq, kind, value)
                            and again(value, t))
            return
        self.unsaved = None
        self.worker.inbox.put(message(ref))
        self.history.append((q, kind, value, ref))
        self.tally.apply(q, kind, value, ref, +1)
        self.say("")
        self.current, self.key_t = (self.ready.popleft() if self.ready else None), t or time.time()
        self.show()

    def undo(self):
        if self.closing or self.workers.finished:
            return
        if not self.history:
            self.say(f"nothing to undo: u takes back the last {UNDO_DEPTH} answers of this session")
            return
        self.unsaved = None  # an answer still unsaved is dropped with the image it was for
        q, kind, value, ref = self.history.pop()
        try:
            if kind == "verdict":
                self.store.remove_verdict(ref)
            elif kind == "recheck":
                self.store.remove_recheck(ref)
            elif ref:
                self.store.remove(self.rlhf.ds.hash_of(q.index))
        except StoreError as err:  # the answer stays given; u can be pressed again
            self.history.append((q, kind, value, ref))
            self.say(f"cannot undo now: {err}", "error")
            return
        self.worker.inbox.put(msg.VerdictUndone(ref) if kind == "verdict" else msg.AnswerUndone(q))
        self.tally.apply(q, kind, value, ref, -1)
        if self.current is not None:
            self.ready.appendleft(self.current)
        self.current = q
        given = ("yes" if value else "no") if kind == "verdict" else "skip" if value is SKIP else self.names[value]
        if kind == "recheck":
            self.say(f"undone: your second look at {os.path.basename(q.path)} ({given}); the earlier answer "
                     "stands until you answer it again")
            self.show()
            return
        self.say(f"undone: {os.path.basename(q.path)} ({given}) is removed and will train nothing; answer it again")
        self.show()

    def quit(self, why):
        """Stop taking keys; the poll closes the window once the running update has finished."""
        if self.closing:
            return
        self.closing, running = True, self.workers.running is not None
        self.log("quit", why=why, update_running=running)
        if self.unsaved:
            print(f"warning: the answer to {self.current.path} could not be saved and is not in the store: "
                  "it will be asked again after --resume", file=sys.stderr)
        self.worker.stop()
        self.guesser.tell(stopping=True)
        for b in self.buttons:
            b.configure(state="disabled")
        self.say("Finishing the running update, then saving the checkpoint; every answer is saved already."
                 if running else "Saving the checkpoint…")

    # --- the workers' messages --------------------------------------------------------------
    def poll(self):
        for _ in range(POLL_BATCH):
            try:
                message = self.outbox.get_nowait()
            except queue.Empty:
                break
            try:
                self.handle(message)
            except Exception:  # shown in the message bar; the poll must go on
                self.callback_error(*sys.exc_info())
        if self.signals and not self.closing:
            self.quit("signal")
        if self.closing and not self.worker.is_alive():
            self.after_id = None
            self.root.destroy()
            return
        self.after_id = self.root.after(POLL_MS, self.poll)

    def handle(self, message):
        if isinstance(message, msg.QuestionReady):
            self.ready.append(message.question)
            if self.current is None and not self.closing:
                self.current = self.ready.popleft()
                self.show()
            elif len(self.ready) == 1:
                self.warm_next()
            return
        if isinstance(message, msg.Waiting):
            self.workers.waiting = message.count
        else:
            kind, fields = self.workers.take(message)
            self.log(kind, **fields)
            if isinstance(message, msg.WorkerFailed):
                print(f"error: {message.text}", file=sys.stderr)
                self.say(message.text, "error")
            elif isinstance(message, msg.SessionDone):
                self.say(f"Session complete: {self.tally.answered()} answers, {message.updates} updates. Close the "
                         "window (q).", "done")
        self.show() if self.current is None else self.status_line()

    def status_line(self):
        q, epochs = self.current, self.cfg.epochs
        epoch = q.epoch + 1 if q else min(self.workers.epoch + 1, epochs)
        where = f"{q.left} left in epoch {epoch}/{epochs}" if q else f"epoch {epoch}/{epochs}"
        warning = balance_warning(self.tally.counts(), self.names)
        text = (f"{self.tally.line(where)}\n{self.workers.training_text(self.cfg.answers_per_update())}"
                + (f"\n{warning}" if warning else ""))
        if text != self.status_text:
            self.status_text = text
            self.status.configure(text=text)
            self.log("status", text=text)


def run_session(root, rlhf):
    """The labeling session of RLHFRun `rlhf` in the window from open_root(): 0, or 1 when training failed
    (then the caller keeps the last good checkpoint instead of saving); every answer is in the store."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # one core trains, the other keeps keys quick (bench/gui_latency.py)
    # Every Tk call hands the GIL back; with the default switch interval a busy run worker would make each of
    # a key's many Tk calls wait a whole interval for it.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    outbox = queue.Queue()
    guesser = Guesser(rlhf, outbox, (root.winfo_screenwidth(), root.winfo_screenheight()))
    worker = RunWorker(rlhf, outbox, guesser)
    # The Tk thread's own connection, for its commits: a short busy timeout, so a store locked by another
    # program freezes no key for long (the answer is kept and retried instead).
    gui_store = type(rlhf.store)(rlhf.store.path, busy_timeout=0.5)
    window = LabelingWindow(root, rlhf, gui_store, rlhf.cfg, guesser, worker, outbox)

    def on_signal(signum, frame):  # Ctrl-C, kill: the poll quits as the q key does
        window.signals, window.signum = window.signals + 1, signum
        if window.signals > 1:  # asked twice: do not wait for the running update
            print("quit without waiting for the running update: every answer is saved, the checkpoint is "
                  "the last finished update's; continue with --resume", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        guesser.start()
        worker.start()
        window.show()
        root.deiconify()
        window.after_id = root.after(POLL_MS, window.poll)
        root.mainloop()
        if window.after_id is not None:  # the window went without a quit: stop polling it
            try:
                root.after_cancel(window.after_id)
            except tk.TclError:
                pass
        worker.stop()
        guesser.tell(stopping=True)
        while worker.is_alive():  # the window went without a quit: the update still finishes
            worker.join(0.2)
        guesser.join(5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.setswitchinterval(switch)
        gui_store.close()
        if window.events:
            window.events.close()
    # a signal ends the process the usual way, 128 + its number, once the checkpoint is saved by the caller
    return 1 if worker.failed else 128 + window.signum if window.signum else 0
