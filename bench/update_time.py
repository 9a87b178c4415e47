"""Time of one update (8 new answers: reward-model fit + PPO on them and 8 unanswered images) per --finetune.

    python bench/update_time.py                       # 224 px, all / layer4 / head, median of 5
    python bench/update_time.py --image-size 112 --repeats 3

Inputs are real photos from the shared hymenoptera set; with layer4/head the frozen layers' features are
computed once beforehand, as the tool's feature cache does, and that one-off cost is reported apart.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import ImagePool
from learner import Learner

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data", "hymenoptera_data", "train")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=SHARED, help="labelled folder (default %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per mode (after one warm-up)")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ImagePool(args.images, args.image_size)
    idx = list(range(48))
    answers = torch.tensor([ds.labels[i] for i in idx])
    rows = []
    for mode in ("all", "layer4", "head"):
        learner = Learner(ds.num_classes, None, mode, seed=0)
        t0 = time.perf_counter()
        x = learner.encode(ds.batch(idx))
        encode_s = (time.perf_counter() - t0) / len(idx)
        times = []
        for r in range(args.repeats + 1):
            new = slice(8 * (r % 3), 8 * (r % 3) + 8)
            t0 = time.perf_counter()
            learner.update(x[new], answers[new], x[24:40], answers[24:40], x[40:48])
            times.append(time.perf_counter() - t0)
        rows.append((mode, statistics.median(times[1:]), min(times[1:]), max(times[1:]), encode_s))
    print(f"{args.image_size} px, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPU cores, "
          f"median of {args.repeats} updates after a warm-up")
    print("| --finetune | update (median) | min | max | one-off features per image |")
    print("|---|---:|---:|---:|---:|")
    for mode, med, lo, hi, enc in rows:
        print(f"| {mode} | {med * 1000:.0f} ms | {lo * 1000:.0f} ms | {hi * 1000:.0f} ms | "
              f"{'-' if mode == 'all' else f'{enc * 1000:.1f} ms'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
