"""Batch inference on 1 process against N processes under torchrun: images per second, same run.

    python bench/ddp_inference.py                          # shared ants/bees photos, 1 and 2 processes
    python bench/ddp_inference.py --processes 1 2 4 --device cuda --images DIR --model runs/latest

Every round runs `inference.py FOLDER --csv` once per process count (plain python for 1, torchrun
--standalone for more), interleaved; the medians over --repeats rounds are reported. Two figures each:
images/s as inference.py reports it (from the file list to the written rows: decoding, forward, gather),
and the wall time of the whole command (interpreter and torch start-up, model load, process group).
The CSVs of every process count are compared byte for byte. Without --model, a random-init ResNet18
checkpoint at 224 px is written to a temporary folder.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset import IMAGENET_MEAN, IMAGENET_STD
from models import PolicyModel

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "hymenoptera_data", "train")


def random_checkpoint(path):
    torch.manual_seed(0)
    torch.save({"format_version": 1, "policy": PolicyModel(2).state_dict(), "class_names": ["ants", "bees"],
                "image_size": 224, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "step": 0}, path)


def run_once(n, args, model, csv_path):
    """(images/s reported by inference.py, wall seconds) of one classification of the folder."""
    script = [os.path.join(ROOT, "inference.py"), args.images, "--model", model, "--csv", csv_path,
              "--batch-size", str(args.batch_size), "--precision", args.precision, "--device", args.device]
    if args.workers is not None:
        script += ["--workers", str(args.workers)]
    cmd = [sys.executable, *script] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={n}", *script]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rate = float(re.search(r"([0-9.]+) images/s", proc.stdout).group(1))
    return rate, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=SHARED, help="folder to classify (default %(default)s)")
    p.add_argument("--model", help="checkpoint or run folder (default: random-init ResNet18, 224 px)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--repeats", type=int, default=3, help="rounds over every process count; medians reported")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, help="decoding processes per inference process (default: inference.py's)")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"), help="as inference.py")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="as inference.py")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or os.path.join(tmp, "random.pt")
        if not args.model:
            random_checkpoint(model)
        results = {n: [] for n in args.processes}
        for r in range(args.repeats):
            for n in args.processes:
                results[n].append(run_once(n, args, model, os.path.join(tmp, f"{n}.csv")))
                print(f"round {r + 1}, {n} process(es): {results[n][-1][0]:.1f} images/s, "
                      f"{results[n][-1][1]:.1f} s wall", flush=True)
        csvs = {}
        for n in args.processes:
            with open(os.path.join(tmp, f"{n}.csv"), "rb") as f:
                csvs[n] = f.read()
    same = all(c == csvs[args.processes[0]] for c in csvs.values())
    base = statistics.median(r for r, _ in results[args.processes[0]])
    base_wall = statistics.median(w for _, w in results[args.processes[0]])
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"\n{args.images}: {args.precision}, batch {args.batch_size}, {device}, median of {args.repeats}")
    print("| processes | images/s | vs 1 | wall s | vs 1 |")
    print("|---|---|---|---|---|")
    for n in args.processes:
        rate = statistics.median(r for r, _ in results[n])
        wall = statistics.median(w for _, w in results[n])
        print(f"| {n} | {rate:.1f} | {rate / base:.2f}x | {wall:.1f} | {base_wall / wall:.2f}x |")
    print(f"CSV identical across process counts: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
