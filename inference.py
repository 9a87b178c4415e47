"""Classify images with a trained policy: a window to look at one image at a time, or a batch CLI.

    python inference.py                                  # window with the newest run's model (runs/latest)
    python inference.py --model runs/NAME --open DIR     # window showing DIR; arrow keys browse it
    python inference.py photo.jpg more_photos/           # table of predictions, folders searched recursively
    python inference.py DIR --csv out.csv                # or --json out.json: path, class, every probability
    python inference.py DIR --model rlhf_models.pth      # a checkpoint written by the original script
    torchrun --nproc_per_node=2 inference.py DIR --csv out.csv   # split over 2 processes, one CSV

Exit code 0 when at least one image was classified, 2 on bad input or when none could be.
"""
import argparse
import csv
import functools
import io
import json
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections import namedtuple

import torch
from PIL import Image

from checkpoint import CHECKPOINT_NAME, CheckpointError, atomic_write_bytes, load_checkpoint, resolve_run_dir
from ddp import PeerLostError, Ranks, speaks_for_job, stopped_job_line
from dataset import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, list_image_files, load_image, normalize

# The original script trained ants/bees at 224 px on ImageNet statistics and saved no class names.
ORIGINAL_CLASSES = ("ants", "bees")
ORIGINAL_IMAGE_SIZE = 224
VIEW_MAX = 1600  # the window keeps images no larger than this, so refitting on resize stays quick


class InferenceError(Exception):
    """Bad input from the user: reported as one line naming the file and the fix, exit code 2."""


# A policy in eval mode with what reading images needs; step is None for the original script's files.
Classifier = namedtuple("Classifier", "net class_names image_size mean std name step")


def load_classifier(spec=None):
    """The policy of a checkpoint file, a run folder or a `latest` link (default runs/latest).

    Also reads the original script's {'policy_model': state_dict} files.
    """
    path = spec or os.path.join("runs", "latest")
    if os.path.isdir(path) or os.path.basename(path) == "latest":
        if not os.path.lexists(path):
            raise InferenceError(f"no trained model yet ({path} does not exist): train first: "
                                 "python train_rlhf.py (or pass --model PATH)")
        path = os.path.join(resolve_run_dir(path), CHECKPOINT_NAME)
    ckpt = load_checkpoint(path)
    if isinstance(ckpt.get("policy"), dict) and ckpt.get("class_names"):
        state, names = ckpt["policy"], [str(c) for c in ckpt["class_names"]]
        size = int(ckpt.get("image_size", ORIGINAL_IMAGE_SIZE))
        norm = ckpt.get("normalization") or {}
        mean, std = tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD))
        name, step = os.path.basename(os.path.dirname(os.path.abspath(path))), ckpt.get("step")
    elif isinstance(ckpt.get("policy_model"), dict):
        state, names, size = ckpt["policy_model"], list(ORIGINAL_CLASSES), ORIGINAL_IMAGE_SIZE
        mean, std, name, step = IMAGENET_MEAN, IMAGENET_STD, os.path.basename(path), None
    else:
        raise InferenceError(f"{path} names no classes (no class_names) and is not the original script's "
                             "{'policy_model': ...} file: pass the checkpoint.pt of a train_rlhf.py run")
    from models import PolicyModel, fold_batchnorm  # torchvision costs a second: only for a usable file
    net = PolicyModel(len(names))
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise InferenceError(f"{path}: the policy weights do not fit a ResNet18 with {len(names)} classes "
                             f"({_first_line(err)}): pass the checkpoint.pt of a train_rlhf.py run") from None
    return Classifier(fold_batchnorm(net.eval()).to(memory_format=torch.channels_last), names, size, mean, std,
                      name, step)


def pick_precision(choice):
    """--precision auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32."""
    if choice != "auto":  # without those instructions bf16 is emulated, slower than fp32
        return choice
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "bf16" if any(flag in f.read() for flag in ("avx512_bf16", "amx_bf16")) else "fp32"
    except OSError:
        return "fp32"


def _first_line(err):
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_batch(paths, image_size):
    """Decode a batch of files (runs in a DataLoader worker): uint8 stack of the readable ones, error per file."""
    images, errors = [], []
    for path in paths:
        try:
            images.append(load_image(path, image_size))
            errors.append(None)
        except Exception as err:  # any decoder failure is that file's problem, never the whole job's
            errors.append(_first_line(err))
    return (torch.stack(images) if images else None), errors


def classify_files(clf, files, batch_size=32, workers=2, precision="fp32", device="cpu", progress=None):
    """Classify files in batches; one row per file, in order: path, predicted, probabilities, error."""
    batches = -(-len(files) // batch_size)
    loader = torch.utils.data.DataLoader(files, batch_size, num_workers=min(workers, batches) if batches > 1 else 0,
                                         collate_fn=functools.partial(load_batch, image_size=clf.image_size))
    net, rows = clf.net.to(device), []
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
        for start, (images, errors) in zip(range(0, len(files), batch_size), loader):
            probs = []
            if images is not None:
                # Channels-last while still uint8 (a quarter of the bytes to move); normalize keeps the layout.
                x = normalize(images.contiguous(memory_format=torch.channels_last), clf.mean, clf.std).to(device)
                probs = torch.softmax(net(x).float(), dim=1).tolist()
            probs = iter(probs)
            for path, err in zip(files[start:start + batch_size], errors):
                p = None if err else dict(zip(clf.class_names, next(probs)))
                rows.append({"path": path, "error": err, "predicted": max(p, key=p.get) if p else None,
                             "probabilities": p})
            if progress:
                progress(len(rows), len(files))
    return rows


def list_inputs(paths):
    """Files to classify: files as given, folders searched recursively; each file once, first-seen order."""
    files, seen = [], set()
    for p in paths:
        for f in (list_image_files(p) if os.path.isdir(p) else [p]):
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    return files


def check_writable(path, flag):
    """Fail before the work, not after it, when the output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a folder")
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InferenceError(f"cannot write {flag} {path} ({err.strerror}): "
                             "pass a file path in an existing, writable folder") from None


def write_csv(rows, path):
    """Classified rows as CSV (path, predicted, prob_<class>...), written atomically."""
    done = [r for r in rows if r["error"] is None]
    names = list(done[0]["probabilities"]) if done else []
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["path", "predicted"] + [f"prob_{c}" for c in names])
    for r in done:
        out.writerow([r["path"], r["predicted"]] + [f"{r['probabilities'][c]:.6f}" for c in names])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def write_json(rows, path):
    """Classified rows as a JSON list of {path, predicted, probabilities}, written atomically."""
    done = [{k: r[k] for k in ("path", "predicted", "probabilities")} for r in rows if r["error"] is None]
    atomic_write_bytes(path, (json.dumps(done, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def print_table(rows, names, out=sys.stdout):
    """Classified rows as aligned columns: path, predicted class, probability of each class."""
    width = max(len(r["path"]) for r in rows)
    print(f"{'path':<{width}}  {'predicted':<12}" + "".join(f"{c[:8]:>9}" for c in names), file=out)
    for r in rows:
        probs = "".join(f"{r['probabilities'][c]:9.3f}" for c in names)
        print(f"{r['path']:<{width}}  {r['predicted']:<12}{probs}", file=out)


def progress_bar(done, total):
    """A one-line bar on stderr, erased when the job is done."""
    bar = "#" * (30 * done // total)
    sys.stderr.write(f"\r[{bar:<30}] {done}/{total}" + ("\r\033[K" if done == total else ""))
    sys.stderr.flush()


class Window:
    """One image at a time: picture fitted to the window, predicted class, a bar per class."""

    def __init__(self, tk, root, clf, precision):
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
        tk.Label(top, text=f"model {clf.name} · {step} · {clf.image_size} px · {precision}").pack(side="right")
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
                    with Image.open(path) as img:
                        img.draft("RGB", (VIEW_MAX, VIEW_MAX))  # cheap reduced-size JPEG decode
                        view = img.convert("RGB")
                    view.thumbnail((VIEW_MAX, VIEW_MAX))
            except Exception as err:  # the window must outlive any one file; the message goes on screen
                traceback.print_exc()
                row = {"path": path, "error": _first_line(err)}
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
        scale = min(w / self.view.width, h / self.view.height)
        size = (max(1, round(self.view.width * scale)), max(1, round(self.view.height * scale)))
        from PIL import ImageTk  # needs tkinter, which the command line must not
        self.photo = ImageTk.PhotoImage(self.view.resize(size, Image.LANCZOS))
        self.canvas.create_image(w // 2, h // 2, image=self.photo)


def run_window(model, open_path, precision):
    """The window; returns when it is closed."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        raise InferenceError("no display (DISPLAY is not set) for the window: classify from the command line: "
                             "python inference.py IMG_OR_DIR [--csv out.csv]")
    clf = load_classifier(model)
    try:
        import tkinter as tk  # here, not at the top: the command line must run where Tk is missing
        root = tk.Tk()
    except Exception as err:  # ImportError without Tk, TclError without a usable display
        raise InferenceError(f"cannot open the window ({err}): classify from the command line: "
                             "python inference.py IMG_OR_DIR") from None
    window = Window(tk, root, clf, pick_precision(precision))
    if open_path:
        root.after(100, window.open, open_path)
    root.mainloop()
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("paths", nargs="*", metavar="IMG_OR_DIR",
                   help="images or folders (searched recursively) to classify; none: open the window")
    p.add_argument("--model", help="checkpoint file or run folder (default runs/latest); also the original "
                   "script's rlhf_models.pth")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="OUT.csv", help="write path, predicted class and every probability as CSV")
    out.add_argument("--json", metavar="OUT.json", help="write the same as a JSON list")
    p.add_argument("--open", metavar="IMG_OR_DIR", help="window: show this image or folder at start")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes (default %(default)s; 0: decode in the main process)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the batch CLI runs the model (default cpu; auto: CUDA when available)")
    return p


def shard_files(files, batch_size, ranks):
    """This process's share of the files: a contiguous run of whole batches, so every batch holds the same
    images as in one process and the predictions are bit-for-bit the same."""
    batches = -(-len(files) // batch_size)
    first, last = ranks.block(batches)
    return files[first * batch_size:last * batch_size]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.paths and args.open:
        raise InferenceError("--open is for the window: drop it to classify IMG_OR_DIR, or drop IMG_OR_DIR")
    if not args.paths:
        if args.csv or args.json:
            raise InferenceError("--csv/--json need images: python inference.py IMG_OR_DIR ... --csv out.csv")
        if Ranks.launched():
            raise InferenceError("the window is one process: run python inference.py without torchrun, or "
                                 "pass IMG_OR_DIR to classify files")
        return run_window(args.model, args.open, args.precision)
    if args.batch_size < 1 or args.workers < 0:
        raise InferenceError("--batch-size must be at least 1 and --workers at least 0")
    files = list_inputs(args.paths)
    if not files:
        raise InferenceError(f"no images found in {' '.join(args.paths)} ({' '.join(IMAGE_EXTENSIONS)}): "
                             "pass image files or folders that hold them")
    flag, out = ("--csv", args.csv) if args.csv else ("--json", args.json)
    if out:
        check_writable(out, flag)
    clf = load_classifier(args.model)
    precision = pick_precision(args.precision)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: no CUDA device is available here: use --device cpu")
    ranks = Ranks.from_environment(device)
    if device == "cuda" and ranks.active:
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    mine = shard_files(files, args.batch_size, ranks)
    show = progress_bar if sys.stderr.isatty() and len(mine) > 2 * args.batch_size and ranks.is_main else None
    rows = classify_files(clf, mine, args.batch_size, args.workers, precision, device.split(":")[0], progress=show)
    rows = [r for part in ranks.gather(rows) for r in part]  # rank order is file order
    seconds = time.perf_counter() - t0
    ranks.close()
    if not ranks.is_main:
        return 0
    done = [r for r in rows if r["error"] is None]
    for r in (r for r in rows if r["error"]):
        print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    if not done:
        raise InferenceError(f"none of the {len(files)} file(s) could be read as an image (see above): "
                             "pass JPEG, PNG or other image files")
    if out:
        try:
            (write_csv if args.csv else write_json)(rows, out)
        except OSError as err:
            raise InferenceError(f"cannot write {flag} {out} ({err.strerror}): pass a writable path") from None
    else:
        print_table(done, clf.class_names)
    counts = ", ".join(f"{c} {sum(r['predicted'] == c for r in done)}" for c in clf.class_names)
    print(f"{len(done)} of {len(files)} images classified ({counts}), {len(rows) - len(done)} unreadable; "
          f"{len(done) / seconds:.1f} images/s, {precision}, model {clf.name}"
          + (f", {ranks.world} processes" if ranks.active else "")
          + (f"; wrote {out}" if out else ""))
    return 0


def cli():
    try:
        sys.exit(main())
    except (InferenceError, CheckpointError) as err:
        if speaks_for_job():  # under torchrun every process meets it; one says so
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except PeerLostError as err:
        print(stopped_job_line(err, "nothing was written; run it again"), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
