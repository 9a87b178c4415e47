"""--recheck against none, label mode, with slips: how many of the labels a run holds are wrong at its end, the
policy's held-out accuracy, and the share of rechecks that found a slip against a random recheck's.

    python bench/recheck.py [--seeds 0,1] [--fractions 0,0.1] [--noise 0.1] [--passes 3]

The shared digits split 4:1 (label_efficiency.split_folder): the fifth held out is scored, never answered.
Every run: 32 px, random init, the tool's batches (24 labels per update), --order random, --noise-kind slip,
and the same number of questions (--max-answers: the training images), rechecks included. A random recheck
finds a slip with the probability that an answer is wrong, so its share is the run's own share of wrong first
answers.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from answer_ledger import RECHECK, SKIP
from bench_cli import machine
from dataset import ImagePool
from ddp import Ranks
from label_efficiency import split_folder, val_accuracy
from rlhf_run import open_run, run_headless
from run_config import RunConfig
from simulated_labeler import FolderLabeler
from verdict_efficiency import DIGITS


def one_run(ds, val, seed, fraction, noise, passes, out):
    """(figures of one run): wrong labels held, accuracy, rechecks asked, slips they found and fixed."""
    cfg = RunConfig(images=ds.root, feedback="folder", epochs=passes, image_size=32, weights="none", seed=seed,
                    max_answers=len(ds), feedback_noise=noise, noise_kind="slip", recheck=fraction,
                    order="random", checkpoint_every=0, val_every=0, out=out)
    os.makedirs(out)
    run = open_run(cfg, out, ds, None, None, "random", "cpu", Ranks())
    t = time.time()
    run_headless(run, FolderLabeler(ds, noise, 0.0, seed, noise_kind="slip"))
    ledger, truth = run.ledger, ds.labels
    labelled = [i for i, c in ledger.label_of.items() if c is not SKIP]
    first = {i: a.answer for i, a in ledger.answers.items() if a.answer is not SKIP}
    rechecked = [i for i in ledger.rechecks if i in first]
    figures = {
        "seed": seed, "recheck": fraction, "noise": noise, "passes": passes,
        "questions": ledger.given(), "labels": len(labelled),
        "wrong_held": sum(ledger.label_of[i] != truth[i] for i in labelled) / len(labelled),
        "wrong_first": sum(a != truth[i] for i, a in first.items()) / len(first),
        "rechecks": len(rechecked), "slips_found": sum(first[i] != truth[i] for i in rechecked),
        "fixed": sum(ledger.kind_of.get(i) == RECHECK and ledger.label_of[i] == truth[i] for i in rechecked),
        "acc": val_accuracy(run.learner.average.served(), val), "s": round(time.time() - t)}
    run.store.close()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1", help="seeds, comma-separated (default 0,1)")
    parser.add_argument("--fractions", default="0,0.1", help="--recheck values, comma-separated (default 0,0.1)")
    parser.add_argument("--noise", type=float, default=0.1, help="P(slip) of each answer (default 0.1)")
    parser.add_argument("--passes", type=int, default=3, help="epochs of each run (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*came through links")  # the split is made of links, on purpose
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train, held_out = split_folder(DIGITS, os.path.join(tmp, "split"))
        ds = ImagePool(train, 32)
        val = ImagePool(held_out, 32, ds.class_names)
        for seed in (int(s) for s in args.seeds.split(",")):
            for fraction in (float(f) for f in args.fractions.split(",")):
                out = os.path.join(tmp, f"run-{seed}-{fraction}")
                print(json.dumps(one_run(ds, val, seed, fraction, args.noise, args.passes, out)), flush=True)


if __name__ == "__main__":
    main()
