"""What the look-alikes' vote (--neighbour-prior pixels) costs as the answered images grow, on random 32 px images.

    python bench/neighbour_vote_cost.py                      # 1,000 and 10,000 answered images, medians of 15
    python bench/neighbour_vote_cost.py --answered 100000 --repeats 5

Per size: the first vote (every thumbnail made and the weight measured), a vote after one more answer (what
a proposal costs while a person answers), the 8 votes of one update's unanswered images after one more answer,
a vote with no new answer, and the memory the thumbnails hold. Prints the machine beside the figures.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cli import machine
from neighbour_vote import NeighbourVote


def seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_size(answered, repeats, classes=10):
    """{figure: seconds} for a pool of answered + 2 * repeats + 8 images, `answered` of them answered."""
    pool = answered + 2 * repeats + 8
    images = torch.rand(pool, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vote = NeighbourVote(classes, lambda idx: images[idx], seed=0)
    labels = {i: i % classes for i in range(answered)}
    probe = pool - 1
    out = {"first vote": seconds(lambda: vote.prior(probe, labels))}
    after, batch, still = [], [], []
    for r in range(repeats):
        labels[answered + r] = r % classes
        after.append(seconds(lambda: vote.prior(probe, labels)))
        still.append(seconds(lambda: vote.prior(probe, labels)))
        labels[answered + repeats + r] = r % classes
        batch.append(seconds(lambda: vote.priors(list(range(pool - 9, pool - 1)), labels)))
    out["vote after one more answer"] = statistics.median(after)
    out["8 votes of an update, after one more answer"] = statistics.median(batch)
    out["vote with no new answer"] = statistics.median(still)
    held = getattr(vote, "buffer", None)  # the code before 9b3c78d kept a dict of features instead: its "before" row
    held = held.numel() * held.element_size() if held is not None else sum(
        f.numel() * f.element_size() for f in getattr(vote, "features", {}).values())
    out["thumbnails held (MB)"] = held / 1e6
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answered", type=int, nargs="+", default=[1000, 10000], help="answered images per size")
    p.add_argument("--repeats", type=int, default=15, help="timed votes per figure (their median is printed)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads: {args.threads}")
    for n in args.answered:
        for name, value in one_size(n, args.repeats).items():
            unit = "" if "MB" in name else " s"
            print(f"{n:>7} answered  {name:<45} {value:8.3f}{unit}", flush=True)


if __name__ == "__main__":
    main()
