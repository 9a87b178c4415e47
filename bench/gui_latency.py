"""Keypress-to-next-image latency of the labeling window, measured under a private Xvfb with xdotool
while updates run, next to the original design (a new Tk() per image, the update on the GUI thread
every 8 answers). Prints a markdown table; raw timings go to bench/out/gui_latency.json.

    python bench/gui_latency.py                          # 224 px, --finetune all, 60 answers per design
    python bench/gui_latency.py --answers 40 --think 0.5 --threads 1 2

Latency runs from just before `xdotool key` starts (so it includes xdotool's own start, ~10 ms) to
the moment the app has drawn the next image (its RLHF_GUI_EVENTS log, written after Tk's redraw). The
"from X event" columns leave xdotool out: they start when the X server made the key event.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RLHF_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
DEFAULT_IMAGES = os.path.join(SHARED, "hymenoptera_data", "train")
sys.path.insert(0, ROOT)
from xvfb_display import XvfbDisplay


class App:
    """One app process on the display, read through its event log."""

    def __init__(self, cmd, display, log, env=None):
        self.display, self.log = display, log
        self.env = {**os.environ, "DISPLAY": display, "RLHF_GUI_EVENTS": log, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def events(self, kind=None):
        if not os.path.exists(self.log):
            return []
        with open(self.log, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
        return [e for e in map(json.loads, lines) if kind is None or e["kind"] == kind]

    def wait_shown(self, count, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            shown = self.events("shown")
            if len(shown) >= count:
                return shown[count - 1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the app stopped answering (rc {self.proc.poll()}): {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.002)

    def xdotool(self, *args):
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, check=False).stdout

    def focus(self):
        window = self.xdotool("search", "--onlyvisible", "--name", "^rlhf-imgcls").split()[-1]
        self.xdotool("windowfocus", "--sync", window)


def label_key(path, class_names):
    """The answer a careful person gives: the image's class folder."""
    parts = path.split(os.sep)
    return str(next((i for i, c in enumerate(class_names) if c in parts), 0))


def measure(app, answers, think, class_names, new_window_each_time):
    """Answer `answers` images at a person's pace; the latency of each key to the next image shown."""
    shown = app.wait_shown(1)
    app.focus()
    out = []
    for n in range(1, answers + 1):
        time.sleep(think)
        key = label_key(shown["path"], class_names)
        t_send = time.time()
        subprocess.run(["xdotool", "key", key], env=app.env, check=False)
        shown = app.wait_shown(n + 1)
        out.append({"total_ms": 1000 * (shown["t"] - t_send), "in_app_ms": 1000 * (shown["t"] - shown["key_t"]),
                    "t_send": t_send, "key_t": shown["key_t"]})
        if new_window_each_time:
            app.focus()
    return out


def add_queue_wait(app, samples):
    """Time each key waited between the X server and the app's handler: the X server's event time and
    the handler's clock differ by a constant, taken as the smallest difference seen."""
    xtime = {e["t"]: e["xtime"] for e in app.events("key")}
    offsets = [1000 * s["key_t"] - xtime[s["key_t"]] for s in samples]
    for s, offset in zip(samples, offsets):
        s["from_x_ms"] = s["in_app_ms"] + offset - min(offsets)


def during_update(app, samples):
    """How many keys were pressed while an update was running (from the app's update events)."""
    spans, start = [], None
    for e in app.events():
        if e["kind"] == "update_started":
            start = e["t"]
        elif e["kind"] == "metrics" and start is not None:
            spans.append((start, e["t"]))
            start = None
    if start is not None:
        spans.append((start, math.inf))
    return sum(any(a <= s["t_send"] <= b for a, b in spans) for s in samples), len(spans)


def stop(app):
    app.xdotool("key", "q")
    try:
        app.proc.wait(300)
    except subprocess.TimeoutExpired:
        app.proc.kill()


def percentile(values, q):
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


def baseline_app(args):
    """The original design: a new Tk() per image, the update on the GUI thread every batch_size answers."""
    import tkinter as tk

    from PIL import Image, ImageTk

    sys.path.insert(0, ROOT)
    from dataset import ImagePool
    from feedback_store import FeedbackStore
    from learner import Learner
    from rlhf_run import RLHFRun, give_answer
    from run_config import RunConfig

    cfg = RunConfig(images=args.images, image_size=args.image_size, weights="none", finetune="all", batch_size=8,
                    order="random")
    ds = ImagePool(args.images, args.image_size)
    learner = Learner(ds.num_classes, None, "all", seed=1)
    run = RLHFRun(cfg, ds, learner, FeedbackStore(os.path.join(args.out, "feedback.sqlite")), args.out, "random")
    log = open(os.environ["RLHF_GUI_EVENTS"], "a", buffering=1, encoding="utf-8")
    key_t = None
    while (index := run.next_question()) is not None:
        probs = learner.policy_probs(ds.batch([index]))[0]
        root = tk.Tk()
        root.title(f"rlhf-imgcls  {index}  {os.path.basename(ds.paths[index])}")
        with Image.open(ds.paths[index]) as img:
            photo = ImageTk.PhotoImage(img.convert("RGB").resize((448, 448)))
        label = tk.Label(root, image=photo)
        label.pack()
        tk.Label(root, text=f"model: {ds.class_names[int(probs.argmax())]} {float(probs.max()):.0%}").pack()
        answer = []

        def shown(event, root=root, label=label, path=ds.paths[index], key_t=key_t):
            label.unbind("<Expose>")
            root.after_idle(lambda: log.write(json.dumps({"kind": "shown", "t": time.time(), "path": path,
                                                          "key_t": key_t}) + "\n"))

        def on_key(event, root=root, answer=answer):
            t = time.time()
            log.write(json.dumps({"kind": "key", "t": t, "key": event.keysym, "xtime": event.time}) + "\n")
            if event.keysym in ("0", "1"):
                answer.append((int(event.keysym), t))
                root.destroy()
            elif event.keysym == "q":
                root.destroy()

        label.bind("<Expose>", shown)
        root.bind("<KeyPress>", on_key)
        root.mainloop()
        if not answer:
            return
        (a, key_t), = answer
        give_answer(run, index, a, probs)
        if run.update_due():
            log.write(json.dumps({"kind": "update_started", "t": time.time()}) + "\n")
            run.update()
            log.write(json.dumps({"kind": "metrics", "t": time.time()}) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=DEFAULT_IMAGES)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--answers", type=int, default=60, help="answers measured per design (at least 40)")
    p.add_argument("--think", type=float, default=0.3, help="seconds between seeing an image and its key")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads of the window's run")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--baseline-app", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_app:
        return baseline_app(args)
    classes = sorted(d for d in os.listdir(args.images) if os.path.isdir(os.path.join(args.images, d)))
    xvfb = XvfbDisplay()
    display = xvfb.display
    work = tempfile.mkdtemp(prefix="gui-latency-")
    designs = [(f"window: worker thread, torch threads {t}", {"OMP_NUM_THREADS": str(t)}, False) for t in args.threads]
    if not args.no_baseline:
        designs.append(("original: new Tk() per image, update on the GUI thread", {}, True))
    rows, raw = [], {}
    try:
        for n, (name, env, baseline) in enumerate(designs):
            out, log = os.path.join(work, f"run{n}"), os.path.join(work, f"events{n}.jsonl")
            common = ["--images", args.images, "--image-size", str(args.image_size), "--out", out]
            if baseline:
                os.makedirs(out)
                cmd = [sys.executable, os.path.abspath(__file__), "--baseline-app", *common]
            else:
                cmd = [sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--feedback", "gui", "--weights", "none",
                       "--finetune", "all", "--batch-size", "8", "--epochs", "1", *common]
            app = App(cmd, display, log, env)
            samples = measure(app, args.answers, args.think, classes, baseline)
            busy, updates = during_update(app, samples)
            add_queue_wait(app, samples)
            stop(app)
            total = [s["total_ms"] for s in samples]
            from_x = [s["from_x_ms"] for s in samples]
            rows.append(f"| {name} | {len(samples)} | {busy} | {updates} | {percentile(total, .5):.0f} | "
                        f"{percentile(total, .95):.0f} | {max(total):.0f} | {percentile(from_x, .5):.0f} | "
                        f"{percentile(from_x, .95):.0f} | {max(from_x):.0f} |")
            raw[name] = samples
            print(f"measured: {name}", file=sys.stderr)
    finally:
        xvfb.stop()
        shutil.rmtree(work, ignore_errors=True)  # three run folders of checkpoints
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "gui_latency.json"), "w") as f:
        json.dump(raw, f)
    print(f"\nkeypress to next image, {args.image_size} px, --finetune all, batch 8, {os.cpu_count()} cores, "
          f"{args.think}s between image and key\n")
    print("| design | answers | keys during an update | updates started | p50 ms | p95 ms | max ms "
          "| from X event: p50 | p95 | max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
