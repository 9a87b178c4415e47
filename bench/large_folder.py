"""Start-up on large image folders: headless wall and peak memory, launch and resume to the first image.

    python bench/large_folder.py                          # 244 and 10,000 images, 224 px
    python bench/large_folder.py --counts 244 10000 100000 --work /tmp/large

For each count, a folder of that many distinct photos (bench/make_large_folder.py, kept in --work for the
next time) and, each in a fresh run folder:
  headless  train_rlhf.py --feedback folder --max-answers 16 --policy-update ppo --rm-min-answers 1000000
            --weights none: wall seconds and the process's peak resident memory (os.wait4's ru_maxrss)
  launch    train_rlhf.py --weights none (the window, on a private Xvfb): launch to the first image drawn
            (RLHF_GUI_EVENTS "first_shown", before the model loads) and to the model's first guess ("shown");
            the window is then stopped with SIGTERM, which saves
  resume    the same run folder with --resume: the same two times
Launch and resume run --rounds times (a fresh run folder each round): medians, with their range, since
single launches of a 100,000-image folder spread over seconds.
--tool DIR runs the train_rlhf.py of another checkout (e.g. `git archive` of an older commit) on the same
folders, for a before/after table measured in the same conditions.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
from first_image import first_image_seconds
from xvfb_display import XvfbDisplay


def headless(tool, images, out, image_size):
    """(wall seconds, peak resident MB) of a 16-answer headless run. Its reward model is never ready (PPO waits
    for --rm-min-answers; the optimum fit would not): a ready one would go on to train the policy on every
    unanswered image of the folder, a run of days at 100,000 images that measures training, not the start-up and
    memory this row is for."""
    cmd = [sys.executable, os.path.join(tool, "train_rlhf.py"), "--images", images, "--feedback", "folder",
           "--max-answers", "16", "--policy-update", "ppo", "--rm-min-answers", "1000000", "--weights", "none",
           "--image-size", str(image_size), "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tool, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: the headless run on {images} failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_maxrss / 1024


def measure(count, args, display, work):
    """One row of the table for a folder of count images."""
    images = os.path.join(args.work, f"large-{count}")
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_large_folder.py"), "--count", str(count),
                    "--out", images], check=True, stdout=subprocess.DEVNULL)
    wall, peak = headless(args.tool, images, os.path.join(work, f"headless-{count}"), args.image_size)
    launches, resumes = [], []
    for r in range(args.rounds):  # a fresh run folder per launch (a first scan each time), then its resume
        run = os.path.join(work, f"window-{count}-{r}")
        window = [sys.executable, os.path.join(args.tool, "train_rlhf.py"), "--images", images, "--weights",
                  "none", "--image-size", str(args.image_size), "--out", run]
        launches.append(first_image_seconds(window, display, os.path.join(work, f"launch-{count}-{r}.jsonl")))
        resumes.append(first_image_seconds(window + ["--resume"], display,
                                           os.path.join(work, f"resume-{count}-{r}.jsonl")))
    cells = []
    for times in (launches, resumes):  # (first image, first guess) per launch
        for k in (0, 1):
            seconds = [t[k] for t in times]
            cells.append(f"{statistics.median(seconds):.1f} s ({min(seconds):.1f}-{max(seconds):.1f})")
    row = f"| {count:,} | {wall:.1f} s | {peak / 1024:.2f} GB | " + " | ".join(cells) + " |"
    print(row, file=sys.stderr, flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[244, 10000], help="folder sizes to measure")
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the generated folders are kept")
    p.add_argument("--image-size", type=int, default=224, help="model input size in pixels")
    p.add_argument("--rounds", type=int, default=3, help="launches and resumes per folder: medians (and range)")
    p.add_argument("--tool", default=ROOT, help="checkout whose train_rlhf.py is measured (default: this one)")
    args = p.parse_args()
    args.tool = os.path.abspath(args.tool)
    with XvfbDisplay() as xvfb, tempfile.TemporaryDirectory(prefix="large-folder-") as work:
        rows = [measure(count, args, xvfb.display, work) for count in args.counts]
    print(f"\n{args.tool}: {args.image_size} px, {os.cpu_count()} cores, --weights none, fresh run folders\n")
    median = f"median of {args.rounds} (range)"
    print(f"| images in the folder | headless run (16 answers), wall | peak memory | launch → first image, {median} "
          "| launch → first guess | resume → first image | resume → first guess |\n" + "|---:" * 7 + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
