"""Where a verdict run's budget went, on the TUNING split (as optimum_quick.py): per run, the images asked, the yes
answers and how many of them were the simulated person's flips, the wrong labels left at the end, and how many
verdicts each image took. The run is optimum_quick.py's cell (the same run_tool call), so its accuracy is too.

    python bench/verdict_errors.py 150 0,1,2 0.1 persistent          # BUDGET SEEDS NOISE [KIND] [--set KEY=VALUE]
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from bench_cli import machine
from optimum_quick import overrides, tuning_split
from run_config import PPOConfig, RewardModelConfig
from verdict_efficiency import run_tool


def ledger_counts(run):
    """What the run's verdicts were: counts over its ledger against the folders' classes."""
    truth, seen, per_image = run.ds.labels, set(), collections.Counter()
    yes = false_yes = repeats = early_yes = early_false = 0
    for n, v in enumerate(run.ledger.verdicts):
        repeats += (v.image, v.proposed) in seen
        seen.add((v.image, v.proposed))
        per_image[v.image] += 1
        if v.verdict:
            wrong = v.proposed != truth[v.image]
            yes, false_yes = yes + 1, false_yes + wrong
            if n < len(run.ledger.verdicts) // 3:
                early_yes, early_false = early_yes + 1, early_false + wrong
    labels = {i: c for i, c in run.answer_of.items() if isinstance(c, int)}
    return {"verdicts": len(run.ledger.verdicts), "images": len(per_image), "yes": yes, "false_yes": false_yes,
            "first_third_yes": early_yes, "first_third_false_yes": early_false, "repeated_questions": repeats,
            "labels": len(labels), "wrong_labels": sum(c != truth[i] for i, c in labels.items()),
            "verdicts_per_image": dict(sorted(collections.Counter(per_image.values()).items()))}


def one_run(budget, seed, noise, kind, sets):
    """optimum_quick.py's verdict cell, one thread: its counts and its served model's accuracy."""
    torch.set_num_threads(1)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        ds, val = tuning_split(tmp)
        args = types.SimpleNamespace(epochs=3, image_size=32, weights="none", device="cpu")
        acc, _, _ = run_tool(ds, val, None, "random", args, seed, budget, noise, ask="verdict", noise_kind=kind,
                             inspect=lambda run: counts.update(ledger_counts(run)), ppo=PPOConfig(**sets["ppo"]),
                             rm=RewardModelConfig(**sets["rm"]), **sets["run"])
    return {"budget": budget, "seed": seed, "noise": noise, "kind": kind, "acc": acc, **counts, "machine": machine()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("budget", type=int, help="verdicts the run may ask")
    p.add_argument("seeds", help="comma-separated seeds")
    p.add_argument("noise", type=float, help="--feedback-noise")
    p.add_argument("kind", nargs="?", default="persistent", help="--noise-kind")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run setting, by name")
    args = p.parse_args()
    for seed in args.seeds.split(","):
        print(json.dumps(one_run(args.budget, int(seed), args.noise, args.kind, overrides(args.set))), flush=True)


if __name__ == "__main__":
    main()
