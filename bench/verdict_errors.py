"""Where a verdict run's budget went, on the TUNING split (as optimum_quick.py): per run, the images asked, the yes
answers and how many of them were the simulated person's flips, the wrong labels left at the end, and how many
verdicts each image took. Its accuracy is the one optimum_quick.py gives for the same cell.

    python bench/verdict_errors.py 150 0,1,2 0.1 persistent          # BUDGET SEEDS NOISE [KIND] [--set KEY=VALUE]
"""
import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from bench_cli import machine
from ddp import Ranks
from label_efficiency import val_accuracy
from optimum_quick import overrides, tuning_split
from rlhf_run import open_run, run_headless
from run_config import PPOConfig, RewardModelConfig, RunConfig
from simulated_labeler import FolderLabeler
from verdict_efficiency import BATCH


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
    """One headless verdict run on a fresh tuning split, one thread: its counts and its served model's accuracy."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ds, val = tuning_split(tmp)
        out = os.path.join(tmp, "run")
        os.makedirs(out)
        config = RunConfig(images=ds.root, feedback="folder", epochs=3, image_size=32, weights="none", seed=seed,
                           max_answers=budget, feedback_noise=noise, noise_kind=kind, checkpoint_every=0, val_every=0,
                           out=out, ask="verdict", batch_size=BATCH, ppo=PPOConfig(**sets["ppo"]),
                           rm=RewardModelConfig(**sets["rm"]), **sets["run"])
        run = open_run(config, out, ds, None, None, "random", "cpu", Ranks())
        run_headless(run, FolderLabeler(ds, noise, 0.0, seed, noise_kind=kind))
        counts = ledger_counts(run)
        acc = val_accuracy(run.learner.average.served(), val)
        run.store.close()
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
