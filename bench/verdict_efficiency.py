"""Verdict efficiency, the level grid: held-out accuracy against the number of yes/no verdicts, for this tool,
its PPO updater, and the honest competitor, supervised learning from complementary labels; full labels beside.

    python bench/verdict_efficiency.py --jobs 2 --out bench/out/verdicts-grid       # the whole grid (digits)
    python bench/verdict_efficiency.py --methods rlhf_verdict complementary --budgets 300 --noise-rows \
        --out bench/out/verdicts-grid                                              # a part of it, clean only
    python bench/verdict_efficiency.py --jobs 12 --device cuda --out bench/out/verdicts-grid  # on a GPU

Each cell (method, noise, noise kind, budget, seed) is one independent run: --jobs runs that many at once in their
own processes (one thread each). Each finished cell is appended to OUT/cells.jsonl, and a later sitting with the
same setting runs only the cells missing there, so a grid cut short (or split between machines) is continued
rather than restarted.

Every method sees the same simulated person (yes when the proposal is the folder's class; on the noisy rows
flipped with P(noise), either persistently, the same wrong answer when the same thing is asked again, or as an
independent slip per asking), the same images and passes (--epochs), and is scored on a held-out validation folder
(by default every fifth image of each class of the shared digits). The baselines make the tool's updates (one per
8 verdicts or 24 labels, one per 24 unsettled images left over once no answers come), each with the tool's
default --update-epochs in Adam steps on the new answers topped up with replayed ones to --rm-batch-size rows,
as the tool's policy takes its answers; the tool's policy learns from its reward model on unanswered images
besides, which is the method being measured.
A cell whose runs could not spend the whole budget says how many answers they gave.
Methods:
  rlhf_verdict      this tool at its defaults, --ask verdict (the served model; its reward model in its own row)
  rlhf_verdict_ppo  the same with --policy-update ppo, the original design's updater
  complementary     cross-entropy on a yes, -log(1 - p(proposed)) on a no, proposals drawn from its own
                    softmax, never a class already rejected for the image
  rlhf_label        this tool with full labels (--ask label) at the same number of answers
  supervised        cross-entropy on the labels of the images --order random asks first: the labels' baseline
"""
import argparse
import collections
import contextlib
import io
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cli import machine
from dataset import ImagePool
from ddp import Ranks
from label_efficiency import common_flags, plot, run_supervised, split_folder, summarize, val_accuracy, with_replay
from learner import adam, reward_model_loss
from models import PolicyModel, resolve_backbone_weights
from rlhf_run import open_run, run_headless
from run_config import LABEL_BATCH, PPOConfig, RunConfig
from simulated_labeler import FolderLabeler

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data", "digits", "train")
METHODS = ("rlhf_verdict", "complementary", "rlhf_verdict_ppo", "rlhf_label", "supervised")
NOISY_METHODS = ("rlhf_verdict", "complementary")
NOISE_ROWS = ("0.1:persistent", "0.1:slip", "0.2:persistent")
GRID = 2  # the level grid: cells of the earlier, unlevel grid (its baselines without replay) are not reused
STEPS_PER_BATCH = PPOConfig().passes()  # the tool's passes per batch: the complementary learner's steps
BATCH = 8
TAIL_BATCH = RunConfig().unanswered_batch  # the tool's updates once no answers wait: unanswered images each


def run_tool(ds, val, backbone, origin, args, seed, budget, noise, inspect=None, **cfg):
    """This tool, headless, with the simulated person; (val accuracy, verdicts or answers given, the reward
    model's own val accuracy). inspect(run), when given, reads the finished run before it is closed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")  # its `latest` link is made beside it: inside the temporary folder
        os.makedirs(out)
        config = RunConfig(images=ds.root, feedback="folder", epochs=args.epochs, image_size=args.image_size,
                           weights=args.weights, seed=seed, max_answers=budget, feedback_noise=noise,
                           checkpoint_every=0, val_every=0, out=out, **{"batch_size": BATCH, **cfg})
        run = open_run(config, out, ds, None, backbone, origin, args.device, Ranks())
        run_headless(run, FolderLabeler(ds, noise, 0.0, seed, noise_kind=config.noise_kind))
        if inspect is not None:
            inspect(run)
        given = run.ledger.given()
        run.store.close()
        return val_accuracy(run.learner.average.served(), val), given, val_accuracy(run.learner.reward_model, val)


def run_complementary(ds, val, backbone, args, seed, budget, noise, noise_kind="persistent"):
    """Supervised learning from complementary labels on `budget` verdicts (see the module docstring), in updates
    shaped as the tool's: each pass its verdicts so far again, BATCH per update, then its unsettled images (no
    yes, a class left), BATCH per update, each asked a verdict while the budget lasts, and once no verdict comes
    one update per TAIL_BATCH of them left over; every update
    STEPS_PER_BATCH steps on its rows topped up with replayed verdicts (label_efficiency.with_replay)."""
    torch.manual_seed(seed)
    policy = PolicyModel(ds.num_classes, backbone).to(args.device)
    opt = adam(policy.parameters(), 3e-4, args.device)
    labeler, rng = FolderLabeler(ds, noise, 0.0, seed, noise_kind=noise_kind), random.Random(seed)
    rejected, settled, verdicts, pool = {}, set(), [], list(range(len(ds)))
    rng.shuffle(pool)

    def learn(new, seen):
        rows = with_replay(new, seen, rng)
        if rows:
            train_steps(policy, opt, ds, [verdicts[k] for k in rows], args.device)

    for epoch in range(args.epochs):
        again = rng.sample(range(len(verdicts)), len(verdicts))
        for start in range(0, len(again), BATCH):
            learn(again[start:start + BATCH], range(len(verdicts)))
        open_images = [i for i in pool if i not in settled and len(rejected.get(i, ())) < ds.num_classes - 1]
        covered = len(again)  # the tool's updates on its verdicts also take its unsettled images, BATCH each
        idle = 0  # unsettled images left over since the last update, once no verdict comes
        for start in range(0, len(open_images), BATCH):
            new = [ask_verdict(policy, ds, labeler, rng, i, rejected, settled, verdicts, args.device)
                   for i in open_images[start:start + BATCH] if len(verdicts) < budget]
            covered -= BATCH
            if new:
                learn(new, range(len(verdicts) - len(new)))
            elif covered < 0:
                idle += min(BATCH, len(open_images) - start)
                if idle >= TAIL_BATCH:
                    learn([], range(len(verdicts)))
                    idle = 0
        if idle:
            learn([], range(len(verdicts)))
    return val_accuracy(policy, val), len(verdicts), None


def ask_verdict(policy, ds, labeler, rng, i, rejected, settled, verdicts, device):
    """A verdict on image i about a class drawn from the policy (never one already rejected); its row's index."""
    with torch.no_grad():
        policy.eval()
        p = torch.softmax(policy(ds.batch([i]).to(device)), dim=1)[0].cpu()
    allowed = [c for c in range(ds.num_classes) if c not in rejected.get(i, ())]
    c = rng.choices(allowed, weights=[float(p[k]) + 1e-9 for k in allowed])[0]
    v = labeler.verdict(i, c)
    if v:
        settled.add(i)
    else:
        rejected.setdefault(i, set()).add(c)
    verdicts.append((i, c, v))
    return len(verdicts) - 1


def train_steps(policy, opt, ds, batch, device="cpu"):
    x = ds.batch([i for i, _, _ in batch]).to(device)
    classes = torch.tensor([c for _, c, _ in batch], device=device)
    rejected = torch.tensor([not v for _, _, v in batch], device=device)
    policy.train(len(batch) > 1)
    for _ in range(STEPS_PER_BATCH):
        loss = reward_model_loss(policy(x), classes, rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_method(method, ds, val, backbone, origin, args, seed, budget, noise, kind):
    if method == "complementary":
        return run_complementary(ds, val, backbone, args, seed, budget, noise, kind)
    if method == "supervised":
        return run_supervised(ds, val, backbone, args, seed, min(budget, len(ds)), noise)
    if method == "rlhf_label":
        return run_tool(ds, val, backbone, origin, args, seed, min(budget, len(ds)), noise, ask="label",
                        noise_kind=kind, batch_size=LABEL_BATCH)
    update = {"ppo": PPOConfig(policy_update="ppo")} if method == "rlhf_verdict_ppo" else {}
    return run_tool(ds, val, backbone, origin, args, seed, budget, noise, ask="verdict", noise_kind=kind, **update)


WORKER = {}  # per process: the split's datasets and the backbone, made once


def start_worker(train_dir, val_dir, args):
    """Load the split once in this process, on one thread: a cell's result moves with the thread count, so cells
    kept in one cells.jsonl must not depend on the --jobs of the sitting that ran them."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ds = ImagePool(train_dir, args.image_size)
    val = ImagePool(val_dir, args.image_size, ds.class_names)
    backbone, origin = resolve_backbone_weights(args.weights)
    WORKER.update(ds=ds, val=val, backbone=backbone, origin=origin, args=args)


def run_cell(cell):
    """One cell (name, method, noise, kind, budget, seed): (cell, val accuracy, given, reward model's, seconds)."""
    w, (_, method, noise, kind, budget, seed) = WORKER, cell
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' per-update lines would drown the table
        acc, given, rm_acc = run_method(method, w["ds"], w["val"], w["backbone"], w["origin"], w["args"], seed,
                                        budget, noise, kind)
    return cell, acc, given, rm_acc, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DIGITS, help="labelled folder split into train/val (default %(default)s)")
    p.add_argument("--budgets", nargs="+", type=int, default=[150, 300, 600, 1200, 2400], help="verdict budgets")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own one-thread process")
    p.add_argument("--device", default="cpu", help="where the models train: cpu, cuda, cuda:1 ...")
    p.add_argument("--noise-rows", nargs="*", default=list(NOISE_ROWS), metavar="NOISE:KIND",
                   help="noisy rows of " + " and ".join(NOISY_METHODS) + ", each a flip rate and persistent (the "
                   "default kind) or slip (default %(default)s; the flag alone: clean rows only)")
    common_flags(p, METHODS, image_size=32, noise=False)
    args = p.parse_args(argv)
    try:
        noisy = [(float(rate), kind or "persistent") for rate, _, kind in (r.partition(":") for r in args.noise_rows)]
    except ValueError:
        p.error("--noise-rows takes NOISE:KIND pairs such as 0.1:slip")
    if any(kind not in ("persistent", "slip") or not 0 <= rate < 1 for rate, kind in noisy):
        p.error("--noise-rows: each NOISE is a flip rate from 0 to below 1, each KIND persistent or slip")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dir, val_dir = split_folder(args.data, tmp)
        start_worker(train_dir, val_dir, args)
        ds, val, origin = WORKER["ds"], WORKER["val"], WORKER["origin"]
        rows = [(m, 0.0, "persistent") for m in args.methods]
        rows += [(m, rate, kind) for rate, kind in noisy for m in NOISY_METHODS if rate and m in args.methods]
        cells, results = [], {}
        for method, noise, kind in rows:
            name = method if not noise else f"{method} ({noise:g} {kind})"
            results[name] = {b: [] for b in args.budgets}
            if method.startswith("rlhf"):
                results[f"{name}: its reward model"] = {b: [] for b in args.budgets}
            cells += [(name, method, noise, kind, b, seed) for b in args.budgets for seed in args.seeds]
        # seeds in turn, the longest runs first within each: a grid cut short has whole seeds, and its last
        # cells to finish are short ones
        cells.sort(key=lambda c: (c[5], -c[4]))
        cells_path, setting = os.path.join(args.out, "cells.jsonl"), settings(args)
        finished = {(r["name"], r["budget"], r["seed"]): r for r in read_cells(cells_path, setting)}
        for name, _, _, _, b, seed in cells:  # cells an earlier sitting finished are not run again
            if (name, b, seed) in finished:
                r = finished[name, b, seed]
                record(results, name, b, r["acc"], r["given"], r["rm_acc"])
        cells = [c for c in cells if (c[0], c[4], c[5]) not in finished]
        t0, header, ran, here = time.time(), None, 0, machine()
        print(f"machine: {here}", flush=True)
        pool = (multiprocessing.get_context("spawn").Pool(args.jobs, start_worker, (train_dir, val_dir, args))
                if args.jobs > 1 and len(cells) > 1 else None)
        done = pool.imap_unordered(run_cell, cells) if pool else map(run_cell, cells)
        for (name, _, _, _, b, seed), acc, given, rm_acc, seconds in done:
            record(results, name, b, acc, given, rm_acc)
            ran += 1
            with open(cells_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**setting, "name": name, "budget": b, "seed": seed, "acc": acc, "given": given,
                                    "rm_acc": rm_acc, "seconds": seconds, "machine": here}) + "\n")
            print(f"{name:34s} budget {b:5d} seed {seed}: val_acc {acc:.3f}  given {given}  reward model "
                  f"{'-' if rm_acc is None else f'{rm_acc:.3f}'}  {seconds:.0f}s  [{time.time() - t0:.0f}s]",
                  flush=True)
            header = describe(len(ds), len(val), origin, args, t0, cells_path, ran)
            write_table(results, args, header)
        header = header or describe(len(ds), len(val), origin, args, t0, cells_path, ran)
        write_table(results, args, header)
        if pool:
            pool.close()
            pool.join()
    print(header)
    print(summarize(results, args.budgets, [str(b) for b in args.budgets], short_of_budget=True))
    return 0


def settings(args):
    """What a finished cell depends on besides its method, budget and seed: cells of another setting are not
    reused."""
    data = os.path.normpath(os.path.abspath(args.data)).split(os.sep)[-2:]  # the same set wherever it is copied
    return {"data": "/".join(data), "epochs": args.epochs, "image_size": args.image_size,
            "weights": args.weights, "grid": GRID}


def read_cells(path, setting):
    """The cells of cells.jsonl finished under this setting (an earlier, interrupted sitting's)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if all(r.get(k) == v for k, v in setting.items())]


def record(results, name, budget, acc, given, rm_acc):
    results[name][budget].append((acc, given))
    if rm_acc is not None:
        results[f"{name}: its reward model"][budget].append((rm_acc, given))


def describe(n_train, n_val, origin, args, t0, cells_path, ran):
    """The table's header line: split, setting, fairness rule and the time the cells took."""
    cells = read_cells(cells_path, settings(args))
    sitting = (f"; this sitting: {ran} cells in {(time.time() - t0) / 60:.1f} min wall, {args.jobs} at once on "
               f"{os.cpu_count()} CPU cores, device {args.device}" if ran else "")
    return (f"{n_train} training / {n_val} validation images, {args.image_size} px, {args.epochs} epochs, weights "
            f"{origin}, seeds {args.seeds}; same images, passes, replay and {STEPS_PER_BATCH} steps per batch of "
            f"{BATCH} for every method; mean ± std of val accuracy (answers given, where short of the budget); "
            f"{len(cells)} cells, {sum(r['seconds'] for r in cells) / 60:.0f} min of "
            f"runs in all{sitting}; {machines_of(cells)}")


def machines_of(cells):
    """Which machines ran the cells, with how many each: one run's result moves with the machine, so a table
    whose cells came from several says so."""
    counts = collections.Counter(r.get("machine", "a machine not recorded") for r in cells)
    return "cells from " + "; ".join(f"{name}: {n}" for name, n in counts.items())


def write_table(results, args, header):
    """results.md and accuracy.png in args.out, from the cells finished so far."""
    table = summarize(results, args.budgets, [str(b) for b in args.budgets], short_of_budget=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot(results, args.budgets, args.budgets, os.path.join(args.out, "accuracy.png"), header,
         xlabel="verdicts (answers for rlhf_label)")


if __name__ == "__main__":
    sys.exit(main())
