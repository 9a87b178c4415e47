"""A quick look at --policy-update optimum against ppo on a TUNING split (the shared digits' training images
split 4:1 again, so the grid's reported split is never tuned on): one cell per update rule.

    python bench/optimum_quick.py BUDGET SEED ASK(S) UPDATE(S) NOISE(S) [EVIDENCE(S) [NOISE_KIND]]
    # e.g. 300 0 verdict ppo,optimum 0,0.1 hard,posterior slip

Prints one JSON line per cell: the policy's and its reward model's accuracy on the tuning split's held-out
fifth, the answers given and the seconds taken. Every cell: 32 px, random init, 3 passes, batches of 8.
"""
import itertools
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from dataset import ImagePool
from label_efficiency import split_folder
from run_config import PPOConfig, RewardModelConfig
from verdict_efficiency import DIGITS, run_tool


def main(argv):
    budget, seed, asks, updates, noises = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    evidences, kind = (argv[5] if len(argv) > 5 else "posterior"), (argv[6] if len(argv) > 6 else "persistent")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        split_folder(DIGITS, os.path.join(tmp, "outer"))
        split_folder(os.path.join(tmp, "outer", "train"), os.path.join(tmp, "tune"))
        ds = ImagePool(os.path.join(tmp, "tune", "train"), 32)
        val = ImagePool(os.path.join(tmp, "tune", "val"), 32, ds.class_names)
        args = types.SimpleNamespace(epochs=3, image_size=32, weights="none", device="cpu")
        for ask in asks.split(","):
            for update in updates.split(","):
                for noise, evidence in itertools.product((float(n) for n in noises.split(",")),
                                                         evidences.split(",")):
                    t = time.time()
                    acc, given, rm = run_tool(ds, val, None, "random", args, seed, budget, noise, ask=ask,
                                              ppo=PPOConfig(policy_update=update), noise_kind=kind,
                                              rm=RewardModelConfig(verdict_evidence=evidence))
                    print(json.dumps({"ask": ask, "update": update, "evidence": evidence, "noise": noise,
                                      "kind": kind, "budget": budget, "seed": seed, "acc": acc, "rm_acc": rm,
                                      "given": given, "s": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
