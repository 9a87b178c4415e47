"""The labeling window's first images, shown and answered while torch and the models load in the background.

    root = open_root()                            # the session's one Tk root (display errors fail here)
    first = FirstImages(root, cfg, run_dir)       # scans the folder, shows its first unanswered image
    run = first.wait(loader)                      # Tk's loop until the loader thread has the run ready
    first.hand_over(run)                          # answers given meanwhile go to the run as fresh answers

Nothing here imports torch, so launch to first image costs Python, Tk and one Pillow decode. Answers are
committed to the run's store at once. With --ask label the guess shown is recorded as none; with --ask verdict
each image is put with a class drawn uniformly, logged with probability 1/K (the update corrects for the
proposing rule). When the run is ready, those answers are recorded as fresh ones: the reward model has not
seen them.
"""
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import display
from dataset import class_folders, file_sha1, relative_path, scan_image_folder
from feedback_store import FeedbackStore, StoreError
from user_errors import UserError

TITLE = "rlhf-imgcls"
NO_DISPLAY = ("--feedback gui needs a display and {why}: use --feedback folder (the simulated labeler), "
              "or run under a virtual display: xvfb-run python train_rlhf.py ...")
WINDOW_SIZE = (960, 840)
SCREEN_MARGIN = (40, 80)  # left for the window manager's title bar and panels
POLL_MS = 40


def open_root():
    """The session's one Tk root, withdrawn until the window is built, so a missing display fails early
    (display.NoDisplayError)."""
    return display.open_root(NO_DISPLAY, TITLE)


def window_size(root):
    """The window's size, fitted to a small screen: one taller than the screen loses its top or bottom."""
    return tuple(min(size, screen - margin) for size, screen, margin in zip(
        WINDOW_SIZE, (root.winfo_screenwidth(), root.winfo_screenheight()), SCREEN_MARGIN))


@dataclass
class EarlyAnswer:
    """One answer given before the run was ready: a class (or None, a skip), or a verdict on `proposed`."""
    path: str
    sha1: str
    answer: object = None      # --ask label: class index, None for a skip
    proposed: int = -1         # --ask verdict: the class put to the person; verdict 1 yes, 0 no
    verdict: object = None
    row: object = None         # the verdict's store id


class FirstImages:
    """The window while the models load: the first unanswered images of the folder, answered into the store."""

    def __init__(self, root, cfg, run_dir, stop=lambda: False):
        self.root, self.cfg, self.stop = root, cfg, stop
        self.verdicts = cfg.ask == "verdict"
        self.answers, self.quitting, self.current, self.photo = [], False, None, None
        self.rng = random.Random(f"{cfg.seed}:first-images")
        self.names, self.todo, self.store, self.answered = [], [], None, set()
        self.scanned = None  # (paths, skipped, warning lines) of the folder: the run's pool starts from it
        path = os.environ.get("RLHF_GUI_EVENTS")
        self.events = open(path, "a", buffering=1, encoding="utf-8") if path else None
        try:
            self.open_pool(run_dir)
        except (OSError, UserError, ValueError):  # the run's own start says what is wrong, in full
            self.todo = []
        self.build()
        self.next_image()

    def open_pool(self, run_dir):
        """The class names the run will have, the unanswered images in a seeded order, and the run's store."""
        with warnings.catch_warnings(record=True) as said:  # the run's pool says them, once
            warnings.simplefilter("always")
            paths, skipped = scan_image_folder(self.cfg.images)
        self.scanned = paths, skipped, [str(w.message) for w in said]
        self.names = list(self.cfg.classes) if self.cfg.classes else class_folders(
            [relative_path(p, self.cfg.images) for p in paths])
        if len(self.names) < 2 or len(self.names) > 10 or not paths:
            return  # the run refuses this pool in one line; nothing is asked meanwhile
        store = FeedbackStore(os.path.join(run_dir, "feedback.sqlite"), busy_timeout=0.5)
        if store.class_names() not in (None, self.names):
            store.close()
            return
        answered = set(store.answers()) | {r["sha1"] for r in store.verdicts()}
        self.store, self.answered = store, answered
        self.todo = list(paths)
        self.rng.shuffle(self.todo)

    def build(self):
        import tkinter as tk
        root = self.root
        width, height = window_size(root)
        root.geometry(f"{width}x{height}")
        root.title(f"{TITLE}  loading the model")
        self.frame = tk.Frame(root)
        self.frame.pack(fill="both", expand=True)
        keys = ("y yes, n no" if self.verdicts else ", ".join(f"{c} {n}" for c, n in enumerate(self.names)))
        self.note = tk.Label(self.frame, anchor="w", justify="left", padx=10, pady=6, font=("TkDefaultFont", 11),
                             text=("loading the model: its guesses appear when it is ready. Answer now: "
                                   f"{keys}, s skip, q quit" if self.store else "loading the model…"))
        self.note.pack(side="bottom", fill="x")
        self.question = tk.Label(self.frame, anchor="w", padx=10, font=("TkDefaultFont", 22 if self.verdicts else 12,
                                                                         "bold"))
        self.question.pack(side="bottom", fill="x")
        self.canvas = tk.Canvas(self.frame, bg="#202020", highlightthickness=0)
        self.canvas.pack(side="top", fill="both", expand=True)
        self.canvas.bind("<Configure>", lambda e: self.canvas.coords("picture", e.width // 2, e.height // 2))
        self.box = (width - 20, height - 120)
        root.bind("<KeyPress>", self.on_key)
        root.protocol("WM_DELETE_WINDOW", self.quit)

    def next_image(self):
        """Show the next unanswered readable image of the seeded order (none left: say so)."""
        from PIL import ImageTk
        self.current = None
        while self.todo and self.store is not None:
            path = self.todo.pop()
            try:
                sha1 = file_sha1(path)
                if sha1 in self.answered:
                    continue
                picture = display.fit(display.load_picture(path, self.box), self.box)
            except (OSError, ValueError) as err:  # PIL's errors are OSError/ValueError kinds
                self.log("skipped", path=path, why=str(err))
                continue
            self.current = (path, sha1, self.rng.randrange(len(self.names)) if self.verdicts else -1)
            self.photo = ImageTk.PhotoImage(picture)
            self.canvas.delete("all")
            self.canvas.create_image(self.canvas.winfo_width() // 2, self.canvas.winfo_height() // 2,
                                     image=self.photo, tags="picture")
            proposed = self.current[2]
            self.question.configure(text=f"is it {self.names[proposed]}?  (y / n)" if self.verdicts
                                    else os.path.relpath(path, self.cfg.images))
            self.root.after_idle(lambda p=path, c=proposed: self.log("first_shown", path=p, proposed=c,
                                                                     torch_loaded="torch" in sys.modules))
            return
        self.canvas.delete("all")
        self.question.configure(text="")

    def on_key(self, event):
        key = event.char.lower()
        if key == "q":
            self.quit()
        elif self.current is None or self.quitting:
            return
        elif self.verdicts and key in ("y", "n"):
            self.give(verdict=int(key == "y"))
        elif key == "s":
            self.give(skip=True)
        elif not self.verdicts and key.isdigit() and int(key) < len(self.names):
            self.give(answer=int(key))

    def give(self, answer=None, verdict=None, skip=False):
        """Commit the answer to the store (the guess shown: none), then show the next image."""
        path, sha1, proposed = self.current
        try:
            if verdict is not None:
                row = self.store.add_verdict(sha1, path, proposed, 1.0 / len(self.names), verdict, self.cfg.propose,
                                             policy_version=0, epoch=0)
                self.answers.append(EarlyAnswer(path, sha1, proposed=proposed, verdict=verdict, row=row))
            else:
                kind = "skip" if skip else "correction" if self.verdicts else "label"
                self.store.add(sha1, path, None if skip else answer, policy_version=0, epoch=0, kind=kind)
                self.answers.append(EarlyAnswer(path, sha1, answer=None if skip else answer))
        except StoreError as err:  # nothing written: the image stays, the next key tries again
            self.note.configure(text=f"not saved: {err}", fg="#b00020")
            return
        self.log("first_answer", path=path, answer=answer, verdict=verdict, skip=skip)
        self.answered.add(sha1)
        self.next_image()

    def quit(self):
        """Stop taking answers; the process ends once the models are loaded and the run saved."""
        self.quitting = True
        self.note.configure(text="loading the model, then saving: every answer is saved already")

    def log(self, kind, **fields):
        if self.events:
            self.events.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")

    def wait(self, loader):
        """Draw the first image, then start the loader thread and run Tk's loop until it is done; returns its
        result (its error is raised here)."""
        def poll():
            if self.stop() and not self.quitting:
                self.quit()
            if loader.is_alive():
                self.root.after(POLL_MS, poll)
            else:
                self.root.quit()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # the loader holds the GIL in long stretches: keys would wait for it
        try:
            self.root.deiconify()
            self.root.update()  # the first image is on the screen before torch starts loading
            loader.start()
            self.root.after(POLL_MS, poll)
            self.root.mainloop()
        finally:
            sys.setswitchinterval(switch)
        return loader.result()

    def hand_over(self, run):
        """Give the run the answers of this phase as fresh ones; then the window is the session's. Returns how
        many there were."""
        from rlhf_run import take_early_answer  # torch: loaded by now
        self.frame.destroy()
        if self.events:
            self.events.close()
        where = {p: i for i, p in enumerate(run.ds.paths)}
        for a in self.answers:
            if a.path in where:
                take_early_answer(run, where[a.path], a.sha1, a.answer, a.proposed, a.verdict, a.row)
        if self.store is not None:
            self.store.close()
        return len(self.answers)
