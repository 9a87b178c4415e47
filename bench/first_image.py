"""Launch to first image: the labeling window against the original design, in the same run, on a private Xvfb.

    python bench/first_image.py                          # shared ants/bees photos, 224 px, 5 rounds
    python bench/first_image.py --images DIR --rounds 3

Each round launches, interleaved, with a fresh run folder each time:
  window    python train_rlhf.py --images DIR --weights none (224 px, every other flag at its default)
  original  the original design's start-up, reproduced (this script with --baseline-app): import torch and
            torchvision, build the policy and the reward model (ResNet18, random init), read the first
            image, classify it and open a Tk window on it; the original read images lazily, one per window
Time runs from just before the process is started to the app's "shown" event (written after Tk drew the
image, RLHF_GUI_EVENTS). `import torch, torchvision` alone is timed in a third process for reference.
"""
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
from bench_cli import bench_parser, parse_bench_args
from gui_latency import DEFAULT_IMAGES, App
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
    """Seconds from launch to the first image drawn; the app is then stopped (SIGTERM saves and quits)."""
    t0 = time.time()
    app = App(cmd, display, log)
    shown = app.wait_shown(1, timeout=300)
    app.proc.terminate()
    try:
        app.proc.wait(120)
    except subprocess.TimeoutExpired:
        app.proc.kill()
    return shown["t"] - t0


def import_seconds():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torchvision"], check=True)
    return time.perf_counter() - t0


def main():
    args = parse_bench_args(bench_parser(__doc__, images=DEFAULT_IMAGES, image_size=224, rounds=5))
    if args.baseline_app:
        return original_app(args)
    times = {"window": [], "original": [], "import torch, torchvision": []}
    with XvfbDisplay() as xvfb, tempfile.TemporaryDirectory(prefix="first-image-") as work:
        for r in range(args.rounds):
            window = [sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", args.images, "--weights",
                      "none", "--image-size", str(args.image_size), "--out", os.path.join(work, f"run{r}")]
            original = [sys.executable, os.path.abspath(__file__), "--baseline-app", "--images", args.images,
                        "--image-size", str(args.image_size)]
            times["window"].append(first_image_seconds(window, xvfb.display, os.path.join(work, f"w{r}.jsonl")))
            times["original"].append(first_image_seconds(original, xvfb.display, os.path.join(work, f"o{r}.jsonl")))
            times["import torch, torchvision"].append(import_seconds())
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nlaunch to first image, {args.images}, {args.image_size} px, median of {args.rounds} rounds "
          f"({os.cpu_count()} cores):\n")
    print("| what | median | min | max | ratio to original |\n|---|---:|---:|---:|---:|")
    for name, value in med.items():
        print(f"| {name} | {value:.2f} s | {min(times[name]):.2f} s | {max(times[name]):.2f} s "
              f"| {value / med['original']:.2f}x |")


if __name__ == "__main__":
    main()
