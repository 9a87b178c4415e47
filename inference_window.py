"""The classification window of inference.py: one image at a time, fitted to the window, with the predicted
class and a bar per class; a worker thread classifies, the Tk thread only draws (polled with after())."""
import os
import queue
import threading
import traceback

import display
from batch_classifier import classify_files, load_for_flags
from dataset import IMAGE_EXTENSIONS, list_image_files
from user_errors import first_line

VIEW_MAX = 1600  # the window keeps images no larger than this, so refitting on resize stays quick
NO_DISPLAY = ("cannot open the window ({why}): classify from the command line: python inference.py IMG_OR_DIR "
              "[--csv out.csv]")


class Window:
    """One image at a time: picture fitted to the window, predicted class, a bar per class."""

    def __init__(self, tk, root, clf, precision, engine="torch"):
        from tkinter import filedialog
        self.root, self.clf, self.precision, self.dialog = root, clf, precision, filedialog
        self.files, self.pos, self.seq, self.view, self.photo, self.message = [], 0, 0, None, None, ""
        self.requests, self.results = queue.Queue(), queue.Queue()
        root.title("rlhf-imgcls inference")
        root.geometry("960x600")
        top, side = tk.Frame(root), tk.Frame(root)
        top.pack(side="top", fill="x", padx=6, pady=4)
        tk.Button(top, text="Open image… (Ctrl-O)", command=self.pick).pack(side="left")
        tk.Button(top, text="Open folder…", command=lambda: self.pick(folder=True)).pack(side="left", padx=4)
        step = "original script" if clf.step is None else f"step {clf.step}"
        tk.Label(top, text=f"model {clf.name} · {step} · {clf.image_size} px · {engine} {precision}").pack(side="right")
        self.status = tk.Label(root, anchor="w", text="Open an image or a folder (← → browse a folder)")
        self.status.pack(side="bottom", fill="x", padx=6, pady=2)
        side.pack(side="right", fill="y", padx=8, pady=8)
        self.answer = tk.Label(side, font=("Helvetica", 20, "bold"), width=16, anchor="w")
        self.answer.pack(anchor="w")
        self.bars = tk.Canvas(side, width=290, height=30 * len(clf.class_names) + 10, highlightthickness=0)
        self.bars.pack(anchor="w", pady=6)
        self.canvas = tk.Canvas(root, background="#202020", highlightthickness=0, width=200, height=200)
        self.canvas.pack(side="left", fill="both", expand=True)
        self.canvas.bind("<Configure>", lambda e: self.fit())
        for key, action in (("<Control-o>", self.pick), ("<Control-q>", root.destroy),
                            ("<Left>", lambda: self.step(-1)), ("<Right>", lambda: self.step(1))):
            root.bind(key, lambda e, action=action: action())
        threading.Thread(target=self.work, daemon=True).start()
        root.after(50, self.poll)

    def pick(self, folder=False):
        pattern = " ".join(f"*{e} *{e.upper()}" for e in IMAGE_EXTENSIONS)  # Tk's patterns are case-sensitive
        path = (self.dialog.askdirectory(parent=self.root) if folder else self.dialog.askopenfilename(
            parent=self.root, filetypes=[("Images", pattern), ("All files", "*")]))
        if path:
            self.open(path)

    def open(self, path):
        """Show an image, or the first image of a folder (the arrow keys browse the rest)."""
        files = list_image_files(path) if os.path.isdir(path) else [path]
        if not files:
            self.status.config(text=f"{path} holds no images ({' '.join(IMAGE_EXTENSIONS)})", fg="red")
            return
        self.files, self.pos = files, 0
        self.step(0)

    def step(self, delta):
        if self.files and 0 <= self.pos + delta < len(self.files):
            self.pos, self.seq = self.pos + delta, self.seq + 1
            self.requests.put((self.seq, self.files[self.pos]))
            self.status.config(text=f"classifying {self.files[self.pos]} …", fg="black")

    def work(self):
        # Worker thread: decodes and classifies, never touches a widget; only the newest request matters.
        while True:
            seq, path = self.requests.get()
            while not self.requests.empty():
                seq, path = self.requests.get_nowait()
            view = None
            try:
                row = classify_files(self.clf, [path], workers=0, precision=self.precision)[0]
                if row["error"] is None:
                    view = display.load_picture(path, (VIEW_MAX, VIEW_MAX))
            except Exception as err:  # the window must outlive any one file; the message goes on screen
                traceback.print_exc()
                row = {"path": path, "error": first_line(err)}
            self.results.put((seq, path, view, row))

    def poll(self):
        while not self.results.empty():  # this thread is the only reader, so empty() is reliable here
            seq, path, view, row = self.results.get_nowait()
            if seq == self.seq:
                self.show(path, view, row)
        self.root.after(50, self.poll)

    def show(self, path, view, row):
        self.view, self.message, name = view, "", os.path.basename(path)
        probs = row.get("probabilities") or {}
        self.bars.delete("all")
        for k, (cls, p) in enumerate(probs.items()):
            y, color = 8 + 30 * k, "#2e7d32" if cls == row["predicted"] else "#6a8fbf"
            self.bars.create_text(0, y + 10, text=cls[:12], anchor="w", font=("Helvetica", 11))
            self.bars.create_rectangle(95, y, 235, y + 20, outline="#999999")
            self.bars.create_rectangle(95, y, 95 + round(140 * p), y + 20, fill=color, outline="")
            self.bars.create_text(240, y + 10, text=f"{p:.1%}", anchor="w", font=("Helvetica", 10))
        where = f"{self.pos + 1}/{len(self.files)}  {path}"
        if row["error"]:
            self.answer.config(text="unreadable", fg="red")
            self.status.config(text=f"{where}: cannot read this file: {row['error']}", fg="red")
            self.root.title(f"rlhf-imgcls inference — {name}: unreadable")
            self.message = f"cannot read {name}\n{row['error']}"
            return self.fit()
        self.answer.config(text=f"{row['predicted']}  {probs[row['predicted']]:.1%}", fg="black")
        self.status.config(text=where, fg="black")
        self.root.title(f"rlhf-imgcls inference — {name}: {row['predicted']} {probs[row['predicted']]:.0%}")
        self.fit()

    def fit(self):
        """Redraw the picture scaled to fit the canvas (both ways: small digits grow, photos shrink)."""
        w, h = max(self.canvas.winfo_width(), 1), max(self.canvas.winfo_height(), 1)
        self.canvas.delete("all")
        if self.view is None:
            self.canvas.create_text(w // 2, h // 2, text=self.message, fill="#ff8080", width=max(w - 20, 10),
                                    font=("Helvetica", 13))
            return
        from PIL import ImageTk  # needs tkinter, which the command line must not
        self.photo = ImageTk.PhotoImage(display.fit(self.view, (w, h)))
        self.canvas.create_image(w // 2, h // 2, image=self.photo)


def run_window(model, open_path, precision, backend="auto"):
    """The window; returns when it is closed."""
    root = display.open_root(NO_DISPLAY)  # before the model loads, so that a missing display fails at once
    import tkinter as tk  # here, not at the top: the command line must run where Tk is missing
    clf, engine, precision = load_for_flags(model, backend, precision)
    window = Window(tk, root, clf, precision, engine)
    root.deiconify()
    if open_path:
        root.after(100, window.open, open_path)
    root.mainloop()
    return 0
