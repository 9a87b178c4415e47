"""Launch to first image: the labeling window against the original design, in the same run, on a private Xvfb.

    python bench/first_image.py                          # shared ants/bees photos, 224 px, 5 rounds
    python bench/first_image.py --images DIR --rounds 3

Each round launches, interleaved, with a fresh run folder each time:
  window    python train_rlhf.py --images DIR --weights none (224 px, every other flag at its default)
  original  the original design's start-up, reproduced (this script with --baseline-app): import torch and
            torchvision, build the policy and the reward model (ResNet18, random init), read the first
            image, classify it and open a Tk window on it; the original read images lazily, one per window
Time runs from just before the process is started to the app's events (written after Tk drew the image,
RLHF_GUI_EVENTS): the window's "first_shown" (its first image, drawn before torch is imported) and "shown"
(the first question with the model's guess), the original's "shown" (both at once). `import torch,
torchvision` alone is timed in a third process for reference.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
from bench_cli import bench_parser, machine, parse_bench_args
from gui_latency import DEFAULT_IMAGES, App, percentile
from xvfb_display import XvfbDisplay


def original_app(args):
    """The original design up to its first window (a new Tk() per image, the model's guess under it)."""
    import tkinter as tk

    import torch
    import torchvision
    import torchvision.transforms as T
    from PIL import Image, ImageTk

    from dataset import list_image_files
    policy, reward_model = torchvision.models.resnet18(num_classes=2), torchvision.models.resnet18(num_classes=1)
    policy.eval(), reward_model.eval()
    path = list_image_files(args.images)[0]
    transform = T.Compose([T.Resize((args.image_size, args.image_size)), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with Image.open(path) as img:
        img = img.convert("RGB")
    with torch.no_grad():
        probs = torch.softmax(policy(transform(img)[None]), dim=1)[0]
    log = open(os.environ["RLHF_GUI_EVENTS"], "a", buffering=1, encoding="utf-8")
    root = tk.Tk()
    root.title("rlhf-imgcls original")
    photo = ImageTk.PhotoImage(img.resize((448, 448)))
    label = tk.Label(root, image=photo)
    label.pack()
    tk.Label(root, text=f"model: {['ants', 'bees'][int(probs.argmax())]} {float(probs.max()):.0%}").pack()

    def shown(event):
        label.unbind("<Expose>")
        root.after_idle(lambda: log.write(json.dumps({"kind": "shown", "t": time.time(), "path": path}) + "\n"))

    label.bind("<Expose>", shown)
    root.bind("<KeyPress-q>", lambda event: root.destroy())
    root.mainloop()


def first_image_seconds(cmd, display, log):
    """Seconds from launch to the first image drawn, and to the model's first guess drawn (the original draws
    both at once); the app is then stopped (SIGTERM saves and quits)."""
    t0 = time.time()
    app = App(cmd, display, log)
    guess = app.wait_shown(1, timeout=300)
    first = (app.events("first_shown") or [guess])[0]  # the window's picture shown while the model loads
    app.proc.terminate()
    try:
        app.proc.wait(120)
    except subprocess.TimeoutExpired:
        app.proc.kill()
    return first["t"] - t0, guess["t"] - t0


def floor_app(args):
    """The loading window with nothing loading behind it (the key latency it would have without torch's import
    holding the GIL): FirstImages on a throwaway run folder, waiting on a loader that never finishes."""
    import threading

    from first_images import FirstImages, open_root
    from run_config import RunConfig
    cfg = RunConfig(images=args.images, image_size=args.image_size, weights="none")
    work = args.floor_app  # inside the bench's own temporary folder: this process is killed, it cannot clean up
    os.makedirs(work, exist_ok=True)
    idle = threading.Thread(target=threading.Event().wait, daemon=True)  # never done: the app is killed
    FirstImages(open_root(), cfg, work).wait(type("Idle", (), {"start": idle.start, "is_alive": idle.is_alive})())


def keys_while_loading(cmd, display, log, every=0.25, most=12):
    """Keys at a person's pace while the model loads: milliseconds from each key sent to the next image drawn."""
    app = App(cmd, display, log)
    deadline = time.time() + 300
    while not app.events("first_shown") and time.time() < deadline:
        time.sleep(0.002)
    app.focus()
    out = []
    while not app.events("shown") and len(out) < most and app.proc.poll() is None:
        shown, t = len(app.events("first_shown")), time.time()
        app.xdotool("key", "s")
        while len(app.events("first_shown")) <= shown and time.time() < t + 5:
            time.sleep(0.001)
        drawn = app.events("first_shown")
        if len(drawn) > shown and not app.events("shown"):
            out.append(1000 * (drawn[shown]["t"] - t))
        time.sleep(max(0.0, every - (time.time() - t)))
    app.proc.kill()
    app.proc.wait(60)
    return out


def pct(values, q):
    return percentile(values, q) if values else float("nan")


def import_seconds():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torchvision"], check=True)
    return time.perf_counter() - t0


def main():
    parser = bench_parser(__doc__, images=DEFAULT_IMAGES, image_size=224, rounds=5)
    parser.add_argument("--floor-app", metavar="DIR", help=argparse.SUPPRESS)
    args = parse_bench_args(parser)
    if args.baseline_app:
        return original_app(args)
    if args.floor_app:
        return floor_app(args)
    loading, floor = [], []  # key -> next image drawn, ms: while torch loads behind the window, and with nothing
    times = {"window: first image": [], "window: first guess": [], "original: first image and guess": [],
             "import torch, torchvision": []}
    with XvfbDisplay() as xvfb, tempfile.TemporaryDirectory(prefix="first-image-") as work:
        for r in range(args.rounds):
            window = [sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", args.images, "--weights",
                      "none", "--image-size", str(args.image_size), "--out", os.path.join(work, f"run{r}")]
            original = [sys.executable, os.path.abspath(__file__), "--baseline-app", "--images", args.images,
                        "--image-size", str(args.image_size)]
            image, guess = first_image_seconds(window, xvfb.display, os.path.join(work, f"w{r}.jsonl"))
            times["window: first image"].append(image)
            times["window: first guess"].append(guess)
            times["original: first image and guess"].append(
                first_image_seconds(original, xvfb.display, os.path.join(work, f"o{r}.jsonl"))[0])
            times["import torch, torchvision"].append(import_seconds())
            loading += keys_while_loading(window[:-1] + [os.path.join(work, f"k{r}")], xvfb.display,
                                          os.path.join(work, f"k{r}.jsonl"))
            floor += keys_while_loading([sys.executable, os.path.abspath(__file__), "--floor-app",
                                         os.path.join(work, f"floor{r}"), "--images", args.images, "--image-size",
                                         str(args.image_size)], xvfb.display,
                                        os.path.join(work, f"f{r}.jsonl"))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["original: first image and guess"]
    print(f"\nlaunch to first image, {args.images}, {args.image_size} px, median of {args.rounds} rounds; "
          f"{machine()}:\n")
    print("| what | median | min | max | ratio to original |\n|---|---:|---:|---:|---:|")
    for name, value in med.items():
        print(f"| {name} | {value:.2f} s | {min(times[name]):.2f} s | {max(times[name]):.2f} s "
              f"| {value / base:.2f}x |")

    print(f"\nkey -> next image while the model loads, {len(loading)} keys: p50 {pct(loading, 0.5):.1f} ms, "
          f"p95 {pct(loading, 0.95):.1f} ms; the same window with nothing loading, {len(floor)} keys: p50 "
          f"{pct(floor, 0.5):.1f} ms, p95 {pct(floor, 0.95):.1f} ms")


if __name__ == "__main__":
    main()
