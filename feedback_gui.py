"""The labeling window: one Tk root for the whole session, in which a person teaches the model by keyboard.

Three threads; only the Tk thread touches a widget:
  Tk thread  shows the prepared question; commits each answer to SQLite (its own connection) the moment
             its key is pressed, then hands it to the trainer; drains the outbox with after().
  guesser    (labeling_workers.Guesser) hands out the run's next questions and prepares them ahead.
  trainer    (labeling_workers.Trainer) drives the RLHFRun (rlhf_run.py): answers, undos, every update.
RLHF_GUI_EVENTS=FILE appends one JSON line per event (key, shown, update...), for tests and bench/.
"""
import collections
import json
import math
import os
import queue
import signal
import sys
import time
import tkinter as tk
import traceback

import torch
from PIL import ImageTk

from feedback_store import IMPORTED, StoreError
from label_transfer import store_label_rows
from labeling_workers import Guesser, Trainer, fit
from rlhf_run import SKIP

TITLE = "rlhf-imgcls"
POLL_MS = 40
POLL_BATCH = 20     # outbox messages handled per tick, so that a burst never holds up a key
RECENT = 20
UNDO_DEPTH = 20     # answers u can take back, each holding its picture
RETRY_MS = 2000     # an answer the store refused (locked by another program, disk full) is tried again
LOPSIDED_AFTER = 20  # answers before a class under half its fair share is worth a warning
LOPSIDED_CHANCE = 0.01  # ... and only a count that low by chance less often than this (lopsided())
WINDOW_SIZE = (960, 840)
SCREEN_MARGIN = (40, 80)  # left for the window manager's title bar and panels
BAR_ROW = 20        # pixels per class in the bars under the image
NO_DISPLAY = ("--feedback gui needs a display and {why}: use --feedback folder (the simulated labeler), "
              "or run under a virtual display: xvfb-run python train_rlhf.py ...")


class NoDisplayError(Exception):
    """There is no display to open the window on; the message names the ways out."""


def open_root():
    """The session's one Tk root, withdrawn until the session starts, so a missing display fails early."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        raise NoDisplayError(NO_DISPLAY.format(why="DISPLAY is not set"))
    try:
        root = tk.Tk(className=TITLE)
    except tk.TclError as err:
        raise NoDisplayError(NO_DISPLAY.format(why=f"cannot open {os.environ.get('DISPLAY')} ({err})")) from None
    root.withdraw()
    return root


def lopsided(counts, min_answers=LOPSIDED_AFTER, chance=LOPSIDED_CHANCE):
    """Classes under half their fair share (total / number of classes) once min_answers are given, when
    answers this uneven would come by less than `chance` were the classes equally likely: the counts as a
    whole (chi-square) or one class this short (binomial, chance / classes each). Without that test, balanced
    answers among 10 classes warn 78% of the time at 20 answers; with it, about 2%."""
    total, k = sum(counts), len(counts)
    low = [c for c, n in enumerate(counts) if n < 0.5 * total / k]
    if total < min_answers or not low:
        return []
    short = any(binomial_cdf(counts[c], total, 1 / k) < chance / k for c in low)
    return low if short or chi_square_tail(counts) < chance else []


def binomial_cdf(x, n, p):
    """P(X <= x) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))


def chi_square_tail(counts):
    """P-value of the counts against equal shares: the chi-square statistic's upper tail, k - 1 degrees of
    freedom, by the Wilson-Hilferty cube-root normal approximation (no SciPy for one number)."""
    k, expected = len(counts), sum(counts) / len(counts)
    stat, df = sum((n - expected) ** 2 for n in counts) / expected, k - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


class ClassTally:
    """The person's labels per class in this run, kept as the keys are pressed: labels, corrections, yes
    verdicts, and the class left once every other was rejected (imported labels are not the person's)."""

    def __init__(self, names, answers, verdicts):
        self.num_classes = len(names)
        self.counts = [0] * len(names)
        for row in store_label_rows(answers, verdicts, names):
            if row["class"] and row["kind"] != "imported":
                self.counts[names.index(row["class"])] += 1
        self.rejected = {}  # image hash -> classes the person said no to
        for v in verdicts:
            if not v["verdict"]:
                self.rejected.setdefault(v["sha1"], set()).add(v["proposed"])

    def label(self, cls, sign):
        """A label (or correction) given (+1) or undone (-1)."""
        self.counts[cls] += sign

    def verdict(self, sha1, proposed, yes, sign):
        """A yes or no about `proposed` for image sha1, given (+1) or undone (-1)."""
        if yes:
            self.counts[proposed] += sign
            return
        rejected = self.rejected.setdefault(sha1, set())
        if sign < 0:
            self.implied(rejected, -1)
            rejected.discard(proposed)
        else:
            rejected.add(proposed)
            self.implied(rejected, +1)

    def implied(self, rejected, sign):
        # every class but one rejected: the one left is the label (as RLHFRun reads it)
        if len(rejected) == self.num_classes - 1:
            left, = set(range(self.num_classes)) - rejected
            self.counts[left] += sign


class LabelingWindow:
    """The Tk side: widgets, keys, the prepared questions and the poll of the workers' outbox."""

    def __init__(self, root, rlhf, store, cfg, guesser, trainer, outbox):
        self.root, self.rlhf, self.store, self.cfg = root, rlhf, store, cfg
        self.guesser, self.trainer, self.outbox = guesser, trainer, outbox
        self.names = rlhf.ds.class_names
        self.ready = collections.deque()   # prepared questions not shown yet, in order
        self.current, self.photos, self.on_canvas = None, {}, None
        self.history = collections.deque(maxlen=UNDO_DEPTH)  # (question, kind, answer, row added / row id)
        rows, verdicts = store.rows(), store.verdicts()
        given = [r for r in rows if r["answer"] is not None and r.get("kind") != IMPORTED]
        self.answered, self.skipped = len(given), sum(r["answer"] is None for r in rows)
        self.imported = sum(r.get("kind") == IMPORTED for r in rows)
        self.agree = [r["predicted"] == r["answer"] for r in given]
        self.tally = ClassTally(self.names, rows, verdicts)
        self.chart_view = "agreement"  # or "share": the person's answers per class (key c)
        self.status_text = None
        self.asking_verdicts = cfg.ask == "verdict"
        self.yes = [v["verdict"] for v in verdicts]  # the person's yes (1) and no (0), oldest first
        self.metrics, self.running, self.key_t, self.after_id, self.note = {}, None, None, None, None
        self.closing = self.finished = self.no_more = False
        self.signals, self.signum, self.box, self.epoch = 0, 0, guesser.box, rlhf.epoch
        self.unsaved = None  # (question seq, answer) that the store refused; retried until it takes it
        path = os.environ.get("RLHF_GUI_EVENTS")
        self.events = open(path, "a", buffering=1, encoding="utf-8") if path else None
        root.title(TITLE)
        # on a small screen the window fits it: one taller than the screen loses its top or bottom
        width, height = (min(size, screen - margin) for size, screen, margin in zip(
            WINDOW_SIZE, (root.winfo_screenwidth(), root.winfo_screenheight()), SCREEN_MARGIN))
        root.geometry(f"{width}x{height}")
        root.minsize(min(480, width), min(480, height))
        root.protocol("WM_DELETE_WINDOW", lambda: self.quit("window closed"))
        root.report_callback_exception = self.callback_error
        root.bind("<KeyPress>", self.on_key)
        self.message = tk.Label(root, anchor="w", justify="left", padx=10, pady=6, fg="white", wraplength=920)
        self.chart = tk.Canvas(root, height=96, bg="white", highlightthickness=0)
        self.status = tk.Label(root, anchor="w", justify="left", padx=10, font=("TkFixedFont", 10))
        keys = tk.Frame(root)
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
        self.bars = tk.Canvas(root, height=self.bars_height(width), highlightthickness=0)
        self.guess = tk.Label(root, anchor="w", padx=10, font=("TkDefaultFont", 22 if self.asking_verdicts else 11,
                                                               "bold" if self.asking_verdicts else "normal"))
        self.file = tk.Label(root, anchor="w", padx=10, font=("TkDefaultFont", 12, "bold"))
        for w in (self.chart, self.status, keys, self.bars, self.guess, self.file):
            w.pack(side="bottom", fill="x", pady=2)
        self.canvas = tk.Canvas(root, width=self.box[0], height=self.box[1], bg="#202020", highlightthickness=0)
        self.canvas.pack(side="top", fill="both", expand=True)
        self.image_item = self.canvas.create_image(0, 0, anchor="center")
        self.text_item = self.canvas.create_text(0, 0, fill="#dddddd", font=("TkDefaultFont", 14), justify="center")
        self.warmer = tk.Label(root)  # never shown: giving it a photo makes Tk convert the pixels ahead
        self.canvas.bind("<Configure>", self.on_resize)
        self.chart.bind("<Configure>", lambda e: self.draw_chart())
        self.bars.bind("<Configure>", self.on_bars_resize)

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
        self.message.pack(side="top", fill="x", before=self.canvas)

    def callback_error(self, exc, value, tb):
        traceback.print_exception(exc, value, tb)
        self.say(f"window error: {exc.__name__}: {value} (every answer is saved; details on the console)", "error")

    def log(self, kind, **fields):
        if self.events:
            self.events.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")

    # --- showing ----------------------------------------------------------------------------
    def photo(self, q):
        """q's picture as a Tk photo for the current box, converted for the display already."""
        box, photo = self.photos.get(q.seq, (None, None))
        if box != self.box:
            photo = ImageTk.PhotoImage(q.fitted if q.box == self.box else fit(q.picture, self.box))
            self.warmer.configure(image=photo)
            self.photos[q.seq] = (self.box, photo)
        return photo

    def warm_next(self):
        # While the person looks at this image, the next one's photo is made, so a key only swaps them.
        keep = [q for q in (self.current, self.ready[0] if self.ready else None) if q and q.picture]
        self.photos = {q.seq: self.photos[q.seq] for q in keep if q.seq in self.photos}
        if len(keep) == 2 and not self.closing:
            self.photo(keep[1])

    def show(self):
        q, c = self.current, self.canvas
        # The progress widgets are drawn a moment later, once the image has gone to the display.
        self.root.after(1, self.after_show)
        if q is None:
            c.itemconfigure(self.image_item, state="hidden")
            c.itemconfigure(self.text_item, state="normal", text=(
                "Session complete: every epoch is done and the checkpoint saved.\nClose the window (q)."
                if self.finished else "No more questions in this run: training goes on over the answers.\n"
                "Quit (q) at any time; --resume continues." if self.no_more else "preparing the next image…"))
            self.root.title(f"{TITLE}  {'done' if self.finished else 'training' if self.no_more else 'preparing'}")
            for label in (self.file, self.guess):
                label.configure(text="")
            self.bars.delete("all")
            return
        self.guesser.tell(shown=q.seq)
        size = (c.winfo_width(), c.winfo_height())
        if min(size) >= 10 and size != self.box:  # a resize whose event has not come yet: fit what is there
            self.set_box(*size)
        if q.picture is None:
            c.itemconfigure(self.image_item, state="hidden")
            c.itemconfigure(self.text_item, state="normal", text=q.problem + "\nanswer from the file name, or skip (s)")
            self.say(q.problem)
        else:
            self.on_canvas = self.photo(q)  # held while shown, whatever warm_next lets go
            c.itemconfigure(self.image_item, image=self.on_canvas, state="normal")
            c.itemconfigure(self.text_item, state="hidden")
        title = f"{TITLE}  {q.pos}/{len(self.rlhf.ds)}  {os.path.basename(q.path)}"
        self.root.title(title)
        self.file.configure(text=os.path.relpath(q.path, self.rlhf.ds.root))
        self.draw_guess(q)
        key_t, self.key_t = self.key_t, None
        if self.events:  # after_idle runs after Tk's own redraws: "shown" is logged once the image is drawn
            self.root.after_idle(lambda: self.log("shown", seq=q.seq, path=q.path, title=title, key_t=key_t,
                                                  proposed=q.proposed, counts=list(self.tally.counts), box=self.box))

    def after_show(self):
        self.status_line()
        self.draw_chart()
        self.warm_next()

    def bars_columns(self, width):
        """Class bars side by side in two columns when there are many classes and room: the image keeps
        the height they would take."""
        return 2 if len(self.names) > 5 and width >= 760 else 1

    def bars_height(self, width):
        """Pixels the class bars need in a window this wide."""
        return BAR_ROW * -(-len(self.names) // self.bars_columns(width)) + 4

    def on_bars_resize(self, event):
        """The bars' columns follow the window's width, and their height the columns."""
        height = self.bars_height(event.width)
        if int(self.bars["height"]) != height:
            self.bars.configure(height=height)  # the image canvas follows, and its photo is fitted again
        if self.current:
            self.draw_guess(self.current)

    def draw_guess(self, q):
        """The model's guess (or proposal) and, per class, its probability and the person's answers so far."""
        b = self.bars
        b.delete("all")
        top = q.proposed if self.asking_verdicts else int(q.probs.argmax())
        if self.cfg.blind:
            self.guess.configure(text="the model's guess is hidden (--blind)")
        elif self.asking_verdicts:
            self.guess.configure(text=f"Is it  {self.names[top]}?   y yes · n no · 0-{len(self.names) - 1} the right "
                                      "class", fg="#0d47a1")
        else:
            self.guess.configure(text=f"model's guess: {top} {self.names[top]}  ({q.probs[top]:.0%}, policy "
                                      f"v{q.version})")
        width = max(b.winfo_width(), 400)
        columns = self.bars_columns(width)
        rows, low = -(-len(self.names) // columns), set(lopsided(self.tally.counts))
        for c, p in enumerate(map(float, q.probs)):
            x0, y = width // columns * (c // rows), 2 + BAR_ROW * (c % rows)
            right = x0 + width // columns - 10
            n = self.tally.counts[c]
            b.create_text(x0 + 12, y + 9, anchor="w", text=f"{c}  {self.names[c][:14]}")
            b.create_text(right, y + 9, anchor="e", text=f"{n} answer{'' if n == 1 else 's'}",
                          fill="#b00020" if c in low else "#555555")
            if self.cfg.blind:
                continue
            start, end = x0 + 130, right - 150
            b.create_rectangle(start, y + 3, end, y + 16, outline="#bbbbbb")
            b.create_rectangle(start, y + 3, start + max(1, (end - start) * p), y + 16, width=0,
                               fill="#1565c0" if c == top else "#90a4ae")
            b.create_text(end + 8, y + 9, anchor="w", text=f"{p:6.1%}")

    def set_box(self, width, height):
        """The image canvas is width x height: pictures are fitted to it from now on."""
        self.box = self.guesser.box = (width, height)
        for item in (self.image_item, self.text_item):
            self.canvas.coords(item, width // 2, height // 2)
        self.canvas.itemconfigure(self.text_item, width=width - 40)

    def on_resize(self, event):
        if event.width < 10 or event.height < 10:
            return
        self.set_box(event.width, event.height)
        if self.current is not None and self.current.picture is not None:
            self.on_canvas = self.photo(self.current)
            self.canvas.itemconfigure(self.image_item, image=self.on_canvas)

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
            self.toggle_chart()
        elif key in ("q", "Q", "Escape"):
            self.quit(f"key {key}")

    def answer(self, answer, t=None):
        """A class (or SKIP) for the image shown: committed at once, then passed to the trainer."""
        q = self.current
        if q is None or self.closing:
            return
        row = {**self.rlhf.answer_row(q.index, answer, q.probs, q.version), "epoch": q.epoch}
        self.commit(q, "label", answer, lambda: self.store.add(**row), lambda added: ("answer", (q, answer)), t)

    def verdict(self, verdict, t=None):
        """Yes (1) or no (0) to the class proposed for the image shown (--ask verdict)."""
        q = self.current
        if q is None or self.closing:
            return
        self.commit(q, "verdict", verdict, lambda: self.store.add_verdict(
            self.rlhf.ds.hash_of(q.index), q.path, q.proposed, q.behaviour, verdict, self.cfg.propose, q.version,
            q.epoch), lambda row: ("verdict", (q, verdict, row)), t)

    def commit(self, q, kind, value, write, message, t):
        """Write to the store before anything else (a kill from here on loses nothing), then move on."""
        try:
            ref = write()
        except StoreError as err:  # nothing written: the image stays, the answer is tried again (a new key wins)
            self.unsaved = (q.seq, kind, value)
            self.say(f"not saved yet, trying again every {RETRY_MS // 1000} s: {err}", "retry")
            again = self.answer if kind == "label" else self.verdict
            self.root.after(RETRY_MS, lambda: self.current is q and self.unsaved == (q.seq, kind, value)
                            and again(value, t))
            return
        self.unsaved = None
        self.trainer.inbox.put(message(ref))
        self.history.append((q, kind, value, ref))
        self.count(q, kind, value, +1)
        self.say("")
        self.current, self.key_t = (self.ready.popleft() if self.ready else None), t or time.time()
        self.show()

    def undo(self):
        if self.closing or self.finished:
            return
        if not self.history:
            self.say(f"nothing to undo: u takes back the last {UNDO_DEPTH} answers of this session")
            return
        self.unsaved = None  # an answer still unsaved is dropped with the image it was for
        q, kind, value, ref = self.history.pop()
        try:
            if kind == "verdict":
                self.store.remove_verdict(ref)
            elif ref:
                self.store.remove(self.rlhf.ds.hash_of(q.index))
        except StoreError as err:  # the answer stays given; u can be pressed again
            self.history.append((q, kind, value, ref))
            self.say(f"cannot undo now: {err}", "error")
            return
        self.trainer.inbox.put(("undo_verdict", ref) if kind == "verdict" else ("undo", q))
        self.count(q, kind, value, -1)
        if self.current is not None:
            self.ready.appendleft(self.current)
        self.current = q
        given = ("yes" if value else "no") if kind == "verdict" else "skip" if value is SKIP else self.names[value]
        self.say(f"undone: {os.path.basename(q.path)} ({given}) is removed and will train nothing; answer it again")
        self.show()

    def count(self, q, kind, value, sign):
        if kind == "verdict":
            self.yes.append(value) if sign > 0 else self.yes.pop()
            self.tally.verdict(self.rlhf.ds.hash_of(q.index), q.proposed, value, sign)
        elif value is SKIP:
            self.skipped += sign
        else:
            self.answered += sign
            self.tally.label(value, sign)
            self.agree.append(int(q.probs.argmax()) == value) if sign > 0 else self.agree.pop()

    def quit(self, why):
        """Stop taking keys; the poll closes the window once the running update has finished."""
        if self.closing:
            return
        self.closing, running = True, self.trainer.updating.is_set()
        self.log("quit", why=why, update_running=running)
        if self.unsaved:
            print(f"warning: the answer to {self.current.path} could not be saved and is not in the store: "
                  "it will be asked again after --resume", file=sys.stderr)
        self.trainer.stop()
        self.guesser.tell(stopping=True)
        for b in self.buttons:
            b.configure(state="disabled")
        self.say("Finishing the running update, then saving the checkpoint; every answer is saved already."
                 if running else "Saving the checkpoint…")

    # --- the workers' messages --------------------------------------------------------------
    def poll(self):
        for _ in range(POLL_BATCH):
            try:
                kind, payload = self.outbox.get_nowait()
            except queue.Empty:
                break
            try:
                self.handle(kind, payload)
            except Exception:  # shown in the message bar; the poll must go on
                self.callback_error(*sys.exc_info())
        if self.signals and not self.closing:
            self.quit("signal")
        if self.closing and not self.trainer.is_alive():
            self.after_id = None
            self.root.destroy()
            return
        self.after_id = self.root.after(POLL_MS, self.poll)

    def handle(self, kind, payload):
        if kind == "question":
            self.ready.append(payload)
            if self.current is None and not self.closing:
                self.current = self.ready.popleft()
                self.show()
            elif len(self.ready) == 1:
                self.warm_next()
            return
        if kind == "no_more_questions":
            self.no_more = True
        elif kind == "update_started":
            self.running = payload
        elif kind in ("metrics", "refit"):
            self.running = None
            self.metrics = payload if kind == "metrics" else self.metrics
        elif kind == "epoch":
            self.epoch = payload
        elif kind == "error":
            print(f"error: {payload}", file=sys.stderr)
            self.running = None
            self.say(payload, "error")
        elif kind == "done":
            self.finished, self.running = True, None
            self.say(f"Session complete: {self.answered} answers, {payload} updates. Close the window (q).", "done")
        self.log(kind, **({"update": payload.get("update")} if isinstance(payload, dict) else
                          {"text": payload} if kind == "error" else {"epoch": payload} if kind == "epoch" else {}))
        self.show() if self.current is None else self.status_line()

    def status_line(self):
        q, m, epochs = self.current, self.metrics, self.cfg.epochs
        epoch = q.epoch + 1 if q else min(self.epoch + 1, epochs)
        line = f"{self.answered} answered · {self.skipped} skipped · " + (f"{self.imported} imported · "
                                                                          if self.imported else "") + (
            f"{q.left} left in epoch {epoch}/{epochs}" if q else f"epoch {epoch}/{epochs}")
        if self.asking_verdicts:
            line = f"{len(self.yes)} verdicts · " + line
        for name, record in (("yes", self.yes), ("agreement", self.agree)):
            if record and (name == "yes") == self.asking_verdicts:
                recent = record[-RECENT:]
                line += (f"   {name} {sum(recent) / len(recent):.0%} last {len(recent)}"
                         f" · {sum(record) / len(record):.0%} overall")
        last = (f"update {m['update']}: reward {m.get('mean_reward', float('nan')):+.2f} · "
                f"KL {m.get('approx_kl', float('nan')):.4f} · {m.get('update_s', 0):.1f}s" if m else "no update yet")
        need = self.cfg.batch_size - len(self.rlhf.pending) - len(self.rlhf.pending_no)  # a glance at the trainer's lists
        now = ("training stopped (see above)" if self.trainer.failed else "done" if self.finished
               else f"training update {self.running['update']}…" if self.running and self.running["update"]
               else "refitting the reward model without the undone answer…" if self.running
               else "training on the answers" if self.no_more
               else f"next update after {need} more answers" if need > 0 else "update due")
        warning = self.balance_warning()
        text = f"{line}\n{last}   ·   {now}" + (f"\n{warning}" if warning else "")
        if text != self.status_text:
            self.status_text = text
            self.status.configure(text=text)
            self.log("status", text=text)

    def balance_warning(self):
        """A line when the person's answers leave a class under half its fair share (often an ordering
        problem: the images coming class by class), else ''."""
        counts = self.tally.counts
        low = lopsided(counts)
        if not low:
            return ""
        named = ", ".join(f"{self.names[c]}: {counts[c]}" for c in low[:3]) + (" ..." if len(low) > 3 else "")
        return (f"warning: answers lopsided: {named} of {sum(counts)} (fair share {sum(counts) / len(counts):.0f})"
                " · images in class order? · c: chart per class")

    def toggle_chart(self):
        """Key c: the chart shows the agreement over time, or the person's answers per class."""
        self.chart_view = "share" if self.chart_view == "agreement" else "agreement"
        self.log("chart", view=self.chart_view)
        self.draw_chart()

    def draw_chart(self):
        c = self.chart
        c.delete("all")
        w, h = max(c.winfo_width(), 200), int(c["height"])
        if self.chart_view == "share":
            self.draw_share_chart(w, h)
            return
        agree = self.yes if self.asking_verdicts else self.agree
        n = len(agree)
        what = "your yes to its proposals over verdicts" if self.asking_verdicts else "agreement with you over answers"
        c.create_text(8, 4, anchor="nw", font=("TkDefaultFont", 9), fill="#444444",
                      text=f"{what}:  blue last 20 · grey overall · dashed chance   (c: answers per class)")
        x0, x1, y0, y1 = 40, w - 10, 20, h - 6
        c.create_rectangle(x0, y0, x1, y1, outline="#cccccc")
        for v in (0.0, 0.5, 1.0):
            c.create_text(x0 - 4, y1 - v * (y1 - y0), anchor="e", font=("TkDefaultFont", 8), text=f"{v:.0%}")
        chance = y1 - (y1 - y0) / len(self.names)
        c.create_line(x0, chance, x1, chance, dash=(4, 3), fill="#999999")
        if n < 2:
            return
        stride, recent, overall, total = max(1, n // (x1 - x0)), [], [], 0
        for i, a in enumerate(agree):
            total += a
            if i % stride == 0 or i == n - 1:
                x, window = x0 + (x1 - x0) * i / (n - 1), agree[max(0, i - RECENT + 1):i + 1]
                recent += [x, y1 - (y1 - y0) * sum(window) / len(window)]
                overall += [x, y1 - (y1 - y0) * total / (i + 1)]
        c.create_line(*overall, fill="#9e9e9e", width=2)
        c.create_line(*recent, fill="#1565c0", width=2)

    def draw_share_chart(self, w, h):
        """One column per class: its share of the person's answers, beside the fair share and half of it."""
        c, counts = self.chart, self.tally.counts
        total, k, low = sum(counts), len(counts), set(lopsided(counts))
        c.create_text(8, 4, anchor="nw", font=("TkDefaultFont", 9), fill="#444444",
                      text=f"your {total} answers per class:  dashed fair share · dotted half of it, the warning "
                           f"line after {LOPSIDED_AFTER} answers   (c: agreement)")
        x0, x1, y0, y1 = 40, w - 10, 20, h - 18
        scale = max([2 / k] + [n / total for n in counts if total])  # the tallest column, or twice the fair share
        c.create_rectangle(x0, y0, x1, y1, outline="#cccccc")
        for v in (0.0, scale):
            c.create_text(x0 - 4, y1 - v / scale * (y1 - y0), anchor="e", font=("TkDefaultFont", 8), text=f"{v:.0%}")
        step = (x1 - x0) / k
        for cls, n in enumerate(counts):
            left, share = x0 + cls * step, n / total if total else 0.0
            c.create_rectangle(left + 3, y1 - share / scale * (y1 - y0), left + step - 3, y1, width=0,
                               fill="#b00020" if cls in low else "#1565c0")
            c.create_text(left + step / 2, y1 + 2, anchor="n", font=("TkDefaultFont", 8),
                          text=f"{self.names[cls][:10]}: {n}")
        for share, dash in ((1 / k, (4, 3)), (0.5 / k, (1, 3))):
            y = y1 - share / scale * (y1 - y0)
            c.create_line(x0, y, x1, y, dash=dash, fill="#555555")


def run_session(root, rlhf):
    """The labeling session of RLHFRun `rlhf` in the window from open_root(): 0, or 1 when training failed
    (then the caller keeps the last good checkpoint instead of saving); every answer is in the store."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # one core trains, the other keeps keys quick (bench/gui_latency.py)
    # Every Tk call hands the GIL back; with the default 5 ms switch interval a busy trainer thread
    # made each of a key's ~30 Tk calls wait up to 5 ms for it.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    outbox = queue.Queue()
    guesser = Guesser(rlhf, outbox, (root.winfo_screenwidth(), root.winfo_screenheight()))
    trainer = Trainer(rlhf, outbox, guesser)
    # The Tk thread's own connection, for its commits: a short busy timeout, so a store locked by another
    # program freezes no key for long (the answer is kept and retried instead).
    gui_store = type(rlhf.store)(rlhf.store.path, busy_timeout=0.5)
    window = LabelingWindow(root, rlhf, gui_store, rlhf.cfg, guesser, trainer, outbox)

    def on_signal(signum, frame):  # Ctrl-C, kill: the poll quits as the q key does
        window.signals, window.signum = window.signals + 1, signum
        if window.signals > 1:  # asked twice: do not wait for the running update
            print("quit without waiting for the running update: every answer is saved, the checkpoint is "
                  "the last finished update's; continue with --resume", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        guesser.start()
        trainer.start()
        window.show()
        root.deiconify()
        window.after_id = root.after(POLL_MS, window.poll)
        root.mainloop()
        if window.after_id is not None:  # the window went without a quit: stop polling it
            try:
                root.after_cancel(window.after_id)
            except tk.TclError:
                pass
        trainer.stop()
        guesser.tell(stopping=True)
        while trainer.is_alive():  # the window went without a quit: the update still finishes
            trainer.join(0.2)
        guesser.join(5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.setswitchinterval(switch)
        gui_store.close()
        if window.events:
            window.events.close()
    # a signal ends the process the usual way, 128 + its number, once the checkpoint is saved by the caller
    return 1 if trainer.failed else 128 + window.signum if window.signum else 0
