"""A quick look at one cell of the learning grid on a TUNING split (the shared digits' training images split 4:1
again, so the grid's reported split is never tuned on): the tool's settings against each other.

    python bench/optimum_quick.py BUDGET SEED(S) ASK(S) UPDATE(S) NOISE(S) [EVIDENCE(S) [NOISE_KIND]]
    # e.g. 300 0,1,2 verdict ppo,optimum 0,0.1 hard,posterior slip
    python bench/optimum_quick.py 300 0,1,2 verdict baseline 0     # complementary labels on the same split
    python bench/optimum_quick.py 300 0,1,2 verdict optimum 0 --set update_epochs=1 --set rm_steps=1 --jobs 2

Prints one JSON line per cell: the policy's and its reward model's accuracy on the tuning split's held-out
fifth, the answers given, the seconds taken and the machine (a run's result moves with it). Every cell: 32 px,
random init, 3 passes, batches of 8, one thread per cell (--jobs cells at once, each in its own process); --set
overrides any run setting by name.
"""
import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from bench_cli import machine
from dataset import ImagePool
from label_efficiency import run_supervised, split_folder
from run_config import PPOConfig, RewardModelConfig, RunConfig, parser_type
from verdict_efficiency import DIGITS, run_complementary, run_tool


def overrides(pairs):
    """{section: {name: value}} of KEY=VALUE settings, each value parsed as the command line parses its flag."""
    section = {RunConfig: "run", PPOConfig: "ppo", RewardModelConfig: "rm"}
    known = {f.name: (owner, hint) for owner, f, hint in RunConfig.sections()}
    out = {"run": {}, "ppo": {}, "rm": {}}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in known:
            sys.exit(f"--set {pair}: no run setting is called {name}")
        owner, hint = known[name]
        try:
            out[section[owner]][name] = parser_type(hint)(text)
        except (ValueError, argparse.ArgumentTypeError) as e:
            sys.exit(f"--set {pair}: {e}")
    return out


def tuning_split(tmp):
    """(pool, held-out fifth) of the tuning split, made under folder `tmp`: the shared digits' training part of the
    grid's split, split 4:1 again, at 32 px."""
    split_folder(DIGITS, os.path.join(tmp, "outer"))
    split_folder(os.path.join(tmp, "outer", "train"), os.path.join(tmp, "tune"))
    ds = ImagePool(os.path.join(tmp, "tune", "train"), 32)
    return ds, ImagePool(os.path.join(tmp, "tune", "val"), 32, ds.class_names)


def one_cell(task):
    """(the cell's JSON line) of one run: a fresh split in a temporary folder, one thread."""
    budget, seed, ask, update, noise, evidence, kind, sets = task
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ds, val = tuning_split(tmp)
        args = types.SimpleNamespace(epochs=3, image_size=32, weights="none", device="cpu")
        t = time.time()
        if update == "baseline":  # the grid's cross-entropy learner, in updates shaped as the tool's
            if ask == "verdict":
                acc, given, rm = run_complementary(ds, val, None, args, seed, budget, noise, kind)
            else:
                acc, given, rm = run_supervised(ds, val, None, args, seed, budget, noise)
        else:
            acc, given, rm = run_tool(ds, val, None, "random", args, seed, budget, noise, ask=ask, noise_kind=kind,
                                      ppo=PPOConfig(policy_update=update, **sets["ppo"]),
                                      rm=RewardModelConfig(verdict_evidence=evidence, **sets["rm"]), **sets["run"])
        return json.dumps({"ask": ask, "update": update, "evidence": evidence, "noise": noise, "kind": kind,
                           "budget": budget, "seed": seed, "set": {k: v for s in sets.values() for k, v in s.items()},
                           "acc": acc, "rm_acc": rm, "given": given, "s": round(time.time() - t), "machine": machine()})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("budget", type=int, help="answers (or verdicts) the run may ask")
    p.add_argument("seeds", help="comma-separated seeds")
    p.add_argument("asks", help="comma-separated --ask values (label, verdict)")
    p.add_argument("updates", help="comma-separated --policy-update values (optimum, ppo), or baseline: the grid's "
                   "cross-entropy learner (complementary labels on verdicts, supervised on labels)")
    p.add_argument("noises", help="comma-separated --feedback-noise values")
    p.add_argument("evidences", nargs="?", default="posterior", help="comma-separated --verdict-evidence values")
    p.add_argument("kind", nargs="?", default="persistent", help="--noise-kind")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run setting, by name")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    args = p.parse_args()
    sets = overrides(args.set)
    tasks = [(args.budget, int(seed), ask, update, float(noise), evidence, args.kind, sets)
             for ask, update, noise, evidence, seed in itertools.product(
                 args.asks.split(","), args.updates.split(","), args.noises.split(","), args.evidences.split(","),
                 args.seeds.split(","))]
    if args.jobs <= 1:
        for task in tasks:
            print(one_cell(task), flush=True)
        return
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for line in pool.imap_unordered(one_cell, tasks):
            print(line, flush=True)


if __name__ == "__main__":
    main()
