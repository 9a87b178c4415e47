"""Verdict efficiency: validation accuracy against the number of yes/no verdicts, for this tool and the honest
competitor, supervised learning from complementary labels.

    python bench/verdict_efficiency.py --out bench/out/verdicts                  # the README's table (digits)
    python bench/verdict_efficiency.py --budgets 150 --seeds 0 --epochs 1 --out /tmp/ve   # a quick look

Every method sees the same simulated person (yes when the proposal is the folder's class, flipped with
--noise on the noisy rows), the same images, the same number of passes (--epochs) and 4 gradient steps per
batch of 8 answers (PPO's --update-epochs; the complementary learner takes 4 Adam steps per batch too), and
is scored on a held-out validation folder (by default every fifth image of each class of the shared digits).
Methods:
  rlhf_verdict_sample   this tool, --ask verdict --propose sample (a draw from the policy)
  rlhf_verdict_greedy   this tool, --ask verdict --propose greedy (its likeliest class, 10% explored)
  complementary         cross-entropy on a yes, -log(1 - p(proposed)) on a no, proposals drawn from its own
                        softmax, never a class already rejected for the image
  rlhf_label            this tool with full labels (--ask label) at the same number of answers: the reference
"""
import argparse
import os
import random
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import AntBeeDataset  # noqa: E402
from label_efficiency import common_flags, plot, split_folder, summarize, val_accuracy  # noqa: E402
from learner import adam, reward_model_loss  # noqa: E402
from models import PolicyModel, resolve_backbone_weights  # noqa: E402
from rlhf_run import open_run, run_headless  # noqa: E402
from ddp import Ranks  # noqa: E402
from run_config import RunConfig  # noqa: E402
from simulated_labeler import FolderLabeler  # noqa: E402

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data", "digits", "train")
METHODS = ("rlhf_verdict_sample", "complementary", "rlhf_verdict_greedy", "rlhf_label")
NOISY_METHODS = ("rlhf_verdict_sample", "complementary")
STEPS_PER_BATCH = 4  # PPO's default --update-epochs: the complementary learner gets as many steps per batch
BATCH = 8


def run_tool(ds, val, backbone, origin, args, seed, budget, noise, **cfg):
    """This tool, headless, with the simulated person; (val accuracy, verdicts or answers given, the reward
    model's own val accuracy)."""
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(images=ds.root, feedback="folder", epochs=args.epochs, image_size=args.image_size,
                           weights=args.weights, seed=seed, max_answers=budget, feedback_noise=noise,
                           checkpoint_every=0, val_every=0, out=out, batch_size=BATCH, **cfg)
        run = open_run(config, out, ds, None, backbone, origin, "cpu", Ranks())
        run_headless(run, FolderLabeler(ds, noise, 0.0, seed))
        given = run.answers_given()
        run.store.close()
        return val_accuracy(run.learner.policy, val), given, val_accuracy(run.learner.reward_model, val)


def run_complementary(ds, val, backbone, args, seed, budget, noise):
    """Supervised learning from complementary labels on `budget` verdicts (see the module docstring)."""
    torch.manual_seed(seed)
    policy = PolicyModel(ds.num_classes, backbone)
    opt = adam(policy.parameters(), 3e-4)
    labeler, rng = FolderLabeler(ds, noise, 0.0, seed), random.Random(seed)
    rejected, verdicts, pool = {}, [], list(range(len(ds)))
    rng.shuffle(pool)
    for _ in range(args.epochs):
        for start in range(0, len(pool), BATCH):  # new verdicts while the budget lasts, then the stored ones
            batch = []
            for i in pool[start:start + BATCH]:
                if len(verdicts) >= budget or len(rejected.get(i, ())) >= ds.num_classes - 1:
                    continue
                with torch.no_grad():
                    policy.eval()
                    p = torch.softmax(policy(ds.batch([i])), dim=1)[0]
                allowed = [c for c in range(ds.num_classes) if c not in rejected.get(i, ())]
                c = rng.choices(allowed, weights=[float(p[k]) + 1e-9 for k in allowed])[0]
                v = labeler.verdict(i, c)
                rejected.setdefault(i, set()).update(() if v else (c,))
                verdicts.append((i, c, v))
                batch.append((i, c, v))
            if batch:
                train_steps(policy, opt, ds, batch)
        if len(verdicts) >= budget:  # later passes: the stored verdicts again, in batches
            order = verdicts[:]
            rng.shuffle(order)
            for start in range(0, len(order), BATCH):
                train_steps(policy, opt, ds, order[start:start + BATCH])
    return val_accuracy(policy, val), len(verdicts), None


def train_steps(policy, opt, ds, batch):
    x = ds.batch([i for i, _, _ in batch])
    classes = torch.tensor([c for _, c, _ in batch])
    rejected = torch.tensor([not v for _, _, v in batch])
    policy.train(len(batch) > 1)
    for _ in range(STEPS_PER_BATCH):
        loss = reward_model_loss(policy(x), classes, rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_method(method, ds, val, backbone, origin, args, seed, budget, noise):
    if method == "complementary":
        return run_complementary(ds, val, backbone, args, seed, budget, noise)
    if method == "rlhf_label":
        return run_tool(ds, val, backbone, origin, args, seed, min(budget, len(ds)), noise, ask="label")
    rule = method.rsplit("_", 1)[1]
    return run_tool(ds, val, backbone, origin, args, seed, budget, noise, ask="verdict", propose=rule)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DIGITS, help="labelled folder split into train/val (default %(default)s)")
    p.add_argument("--budgets", nargs="+", type=int, default=[150, 300, 600, 1200, 2400], help="verdict budgets")
    common_flags(p, METHODS, image_size=32)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dir, val_dir = split_folder(args.data, tmp)
        ds = AntBeeDataset(train_dir, args.image_size)
        val = AntBeeDataset(val_dir, args.image_size, ds.class_names)
        backbone, origin = resolve_backbone_weights(args.weights)
        rows = [(m, 0.0) for m in args.methods]
        rows += [(m, args.noise) for m in NOISY_METHODS if args.noise and m in args.methods]
        results, t0 = {}, time.time()
        for method, noise in rows:
            name = method if not noise else f"{method} (noise {noise})"
            results[name] = {b: [] for b in args.budgets}
            for b in args.budgets:
                for seed in args.seeds:
                    acc, given, rm_acc = run_method(method, ds, val, backbone, origin, args, seed, b, noise)
                    results[name][b].append((acc, given))
                    if rm_acc is not None:
                        results.setdefault(f"{name}: its reward model", {c: [] for c in args.budgets})[b].append(
                            (rm_acc, given))
                    print(f"{name:34s} budget {b:5d} seed {seed}: val_acc {acc:.3f}  given {given}  reward model "
                          f"{'-' if rm_acc is None else f'{rm_acc:.3f}'}  [{time.time() - t0:.0f}s]", flush=True)
                header = (f"{len(ds)} training / {len(val)} validation images, {args.image_size} px, {args.epochs} "
                          f"epochs, weights {origin}, seeds {args.seeds}, same images, passes and 4 steps per "
                          f"batch of {BATCH} for every method; mean ± std of val accuracy; "
                          f"{(time.time() - t0) / 60:.1f} min on {os.cpu_count()} CPU cores")
                table = summarize(results, args.budgets, [str(b) for b in args.budgets])
                with open(os.path.join(args.out, "results.md"), "w") as f:
                    f.write(header + "\n\n" + table + "\n")
                plot(results, args.budgets, args.budgets, os.path.join(args.out, "accuracy.png"), header,
                     xlabel="verdicts (answers for rlhf_label)")
    print(header)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
