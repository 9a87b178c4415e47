"""Label efficiency: validation accuracy against the number of answers, for this tool and its baselines.

    python bench/label_efficiency.py --out bench/out/label_efficiency           # the README's table
    python bench/label_efficiency.py --budgets 16 all --seeds 0 --out /tmp/le    # a quick look

Every method sees the same simulated labeler (answers from the class folders, optionally noisy) and is
scored on a labelled validation folder. By default the training half of the shared hymenoptera set is
split here: every fifth image of each class is held out for validation.
Methods:
  rlhf_uncertain   this tool: PPO + reward model, --order uncertain
  rlhf_random      the same with --order random
  ppo_human_only   PPO on the person's rewards only, no reward model (--order random)
  original         the original design's update, reproduced: sample, +1/-1, one step per 8 answers on
                   -min(ratio*r, clip(ratio)*r) with probability ratios, no baseline/reward model/KL, and
                   every image asked again each epoch (its budget counts distinct images)
  supervised       cross-entropy on the images --order random asks first (the budget's first of epoch 0's
                   seeded order), same network, same epochs
  supervised_uncertain
                   cross-entropy on exactly the images rlhf_uncertain asked (same seed, budget and noise)
Fair to the baselines: both cross-entropy rows make the updates the tool makes (one per 24 new answers, then one
per 24 unanswered images in every pass, --epochs passes), each STEPS_PER_BATCH (the tool's default --update-epochs)
Adam steps on its new answers topped up to REPLAY_ROWS with replayed ones, as the tool's policy takes them; the
tool's policy learns from its reward model on the unanswered images besides. The original design keeps its own
update (one step per 8 answers): that is the design being reproduced. The RLHF rows' reward models are scored
on the validation images too ("its reward model" rows: the class they would reward most).
"""
import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import textwrap
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import ImagePool
from ddp import Ranks
from learner import adam, evaluate_accuracy
from models import PolicyModel, resolve_backbone_weights
from ppo import original_design_loss
from question_queue import epoch_order
from rlhf_run import open_run, run_headless
from run_config import LABEL_BATCH, PPOConfig, RewardModelConfig, RunConfig
from simulated_labeler import FolderLabeler

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data", "hymenoptera_data", "train")
# In order of importance, so a benchmark cut short has the main comparisons first.
METHODS = ("rlhf_uncertain", "supervised", "supervised_uncertain", "rlhf_random", "original", "ppo_human_only")
STEPS_PER_BATCH = PPOConfig().passes()  # the tool's passes per batch: cross-entropy gets as many Adam steps
REPLAY_ROWS = RewardModelConfig().rm_batch_size  # the tool's rows per update: new answers plus replayed ones
NOISY_METHODS = ("rlhf_uncertain", "supervised")


def split_folder(source, dest, every=5):
    """Symlinked train/val folders: every `every`-th image of each class (sorted) goes to val."""
    for part in ("train", "val"):
        for cls in sorted(os.listdir(source)):
            if os.path.isdir(os.path.join(source, cls)):
                os.makedirs(os.path.join(dest, part, cls), exist_ok=True)
    for cls in sorted(os.listdir(source)):
        folder = os.path.join(source, cls)
        if not os.path.isdir(folder):
            continue
        for i, name in enumerate(sorted(os.listdir(folder))):
            part = "val" if i % every == 0 else "train"
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(dest, part, cls, name))
    return os.path.join(dest, "train"), os.path.join(dest, "val")


def val_accuracy(policy, val):
    """Accuracy of a model (on whatever device it sits) on the validation images."""
    idx, device = list(range(len(val))), next(policy.parameters()).device
    policy.eval()
    return evaluate_accuracy(lambda x: policy(x.to(device)), (val.batch(idx[s:s + 64]) for s in range(0, len(idx), 64)),
                             (torch.tensor(val.labels[s:s + 64]) for s in range(0, len(idx), 64)))


def answered_subset(ds, budget, seed):
    """The images the random-order runs ask first: the first `budget` of epoch 0's order."""
    return epoch_order(len(ds), seed, 0, "random")[:budget]


def run_rlhf(ds, val, backbone, origin, args, seed, budget, noise, **cfg):
    """This tool, headless: (val accuracy, images asked, its reward model's val accuracy, the images it asked
    and answered, in order)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")  # its `latest` link is made beside it: inside the temporary folder
        os.makedirs(out)
        config = RunConfig(images=ds.root, feedback="folder", epochs=args.epochs, image_size=args.image_size,
                           weights=args.weights, finetune=args.finetune, seed=seed, max_answers=budget,
                           feedback_noise=noise, checkpoint_every=0, val_every=0, out=out, **cfg)
        run = open_run(config, out, ds, None, backbone, origin, "cpu", Ranks())
        run_headless(run, FolderLabeler(ds, noise, 0.0, seed))
        run.store.close()
        asked = [i for i, answer in run.answer_of.items() if answer is not None]
        return (val_accuracy(run.learner.average.served(), val), len(run.answer_of),
                val_accuracy(run.learner.reward_model, val), asked)


def baseline_start(ds, backbone, seed, budget, noise):
    """What both baselines start from: the seeded policy and its Adam, the labeler and the images to ask."""
    torch.manual_seed(seed)
    policy = PolicyModel(ds.num_classes, backbone)
    return (policy, adam(policy.parameters(), 3e-4), FolderLabeler(ds, noise, 0.0, seed),
            answered_subset(ds, budget, seed))


def run_original(ds, val, backbone, args, seed, budget, noise):
    policy, opt, labeler, subset = baseline_start(ds, backbone, seed, budget, noise)
    rng = random.Random(seed)
    asked = 0
    policy.train()  # the original never switched to eval mode
    for _ in range(args.epochs):
        states, actions, rewards, old = [], [], [], []
        for i in rng.sample(subset, len(subset)):
            x = ds.batch([i])
            with torch.no_grad():
                probs = torch.softmax(policy(x), dim=1)[0]
            a = int(torch.multinomial(probs, 1))
            answer = labeler.answer(i)
            asked += 1
            states.append(x[0]), actions.append(a), old.append(probs[a])
            rewards.append(1.0 if answer == a else -1.0)
            if len(states) >= 8:
                new = torch.softmax(policy(torch.stack(states)), dim=1)[torch.arange(len(actions)), actions]
                loss = original_design_loss(new, torch.stack(old), torch.tensor(rewards))
                opt.zero_grad()
                loss.backward()
                opt.step()
                states, actions, rewards, old = [], [], [], []
    return val_accuracy(policy, val), asked, None


def with_replay(new, seen, rng, rows=REPLAY_ROWS):
    """One update's rows as the tool takes them: the new ones, topped up to `rows` with a draw of the earlier
    ones (`seen`, those in `new` left out)."""
    fresh = set(new)
    earlier = [i for i in seen if i not in fresh]
    return list(new) + rng.sample(earlier, min(len(earlier), max(0, rows - len(new))))


def tool_shaped_updates(pool_size, asked, epochs, rng, batch=LABEL_BATCH, taken=RunConfig().rm_per_update,
                        tail=RunConfig().unanswered_batch):
    """The answers each update of the tool learns first when it asks `asked` (in order) of a pool: in epoch 1
    the new ones, `batch` per update; in later epochs every answer again (its epochs visit them again). An update
    with answers also takes up to `taken` (--rm-per-update) unanswered images (in epoch 1 only the last, as the
    others are visited after the asking), and each `tail` (--unanswered-batch) unanswered images left makes an
    update of its own. The unanswered teach the tool's policy from its reward model; a baseline's update learns
    from its replayed answers there."""
    unanswered = max(0, pool_size - len(asked))
    for epoch in range(epochs):
        again = list(asked) if epoch == 0 else rng.sample(list(asked), len(asked))
        yield from (again[s:s + batch] for s in range(0, len(again), batch))
        with_answers = (len(again) % batch > 0) if epoch == 0 else math.ceil(len(again) / batch)
        yield from ([] for _ in range(0, max(0, unanswered - taken * with_answers), tail))


def run_supervised(ds, val, backbone, args, seed, budget, noise, subset=None):
    """Cross-entropy on `subset` (default: what --order random asks first), in updates shaped as the tool's
    (tool_shaped_updates, with_replay), LABEL_BATCH answers and STEPS_PER_BATCH steps each."""
    policy, opt, labeler, first_asked = baseline_start(ds, backbone, seed, budget, noise)
    subset = first_asked if subset is None else subset
    label_of, rng, seen = {i: labeler.answer(i) for i in subset}, random.Random(seed), {}
    for new in tool_shaped_updates(len(ds), subset, args.epochs, rng):
        rows = with_replay(new, list(seen), rng)
        seen.update(dict.fromkeys(new))  # answers learnt so far, in order
        if not rows:
            continue
        policy.train(len(rows) > 1)
        x, labels = ds.batch(rows), torch.tensor([label_of[i] for i in rows])
        for _ in range(STEPS_PER_BATCH):
            loss = F.cross_entropy(policy(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return val_accuracy(policy, val), len(subset), None


def run_method(method, ds, val, backbone, origin, args, seed, budget, noise, uncertain_runs):
    """(val accuracy, questions, reward model's val accuracy or None). uncertain_runs: (seed, budget, noise) ->
    rlhf_uncertain's result, so that supervised_uncertain reads the images it asked without a second run."""
    key = (seed, budget, noise)
    if method in ("rlhf_uncertain", "supervised_uncertain") and key not in uncertain_runs:
        uncertain_runs[key] = run_rlhf(ds, val, backbone, origin, args, seed, budget, noise, order="uncertain")
    if method == "rlhf_uncertain":
        return uncertain_runs[key][:3]
    if method == "supervised_uncertain":
        return run_supervised(ds, val, backbone, args, seed, budget, noise, uncertain_runs[key][3])
    if method == "rlhf_random":
        return run_rlhf(ds, val, backbone, origin, args, seed, budget, noise, order="random")[:3]
    if method == "ppo_human_only":
        return run_rlhf(ds, val, backbone, origin, args, seed, budget, noise, order="random",
                        no_reward_model=True)[:3]
    if method == "original":
        return run_original(ds, val, backbone, args, seed, budget, noise)
    return run_supervised(ds, val, backbone, args, seed, budget, noise)


def summarize(results, budgets, labels, short_of_budget=False):
    """Markdown table: one row per method, mean ± standard deviation over seeds for each budget; with
    short_of_budget, the mean answers given where the runs gave fewer than the budget."""
    head = "| method | " + " | ".join(str(b) for b in labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for name in results:
        cells = []
        for b in budgets:
            if not results[name][b]:
                cells.append("-")
                continue
            accs = [acc for acc, _ in results[name][b]]
            asked = statistics.mean(q for _, q in results[name][b])
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cell = f"{statistics.mean(accs):.3f} ± {spread:.3f}"
            if name.startswith("original"):
                cell += f" ({asked:.0f} q)"
            elif short_of_budget and asked < b:
                cell += f" ({asked:.0f} given)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, budgets, x_values, path, title, xlabel="answers (distinct images)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 5))
    for name in results:
        done = [(x, [a for a, _ in results[name][b]]) for x, b in zip(x_values, budgets) if results[name][b]]
        if not done:
            continue
        ax.errorbar([x for x, _ in done], [statistics.mean(a) for _, a in done],
                    yerr=[statistics.stdev(a) if len(a) > 1 else 0 for _, a in done],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results, budgets, n_train, n_val, args, origin, t0):
    """results.md (markdown table) and accuracy.png in args.out; returns (table, header)."""
    labels = [f"{b} (all)" if b == n_train else str(b) for b in budgets]
    table = summarize(results, budgets, labels)
    header = (f"{n_train} training / {n_val} validation images, {args.image_size} px, {args.epochs} epochs, "
              f"weights {origin}, finetune {args.finetune}, seeds {args.seeds}; mean ± std of val accuracy "
              f"(original: questions asked in brackets); {(time.time() - t0) / 60:.1f} min on "
              f"{os.cpu_count()} CPU cores")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot(results, budgets, budgets, os.path.join(args.out, "accuracy.png"), header)
    return table, header


def common_flags(p, methods, image_size, noise=True):
    """The flags every efficiency benchmark takes: seeds, methods, noise (unless the bench has its own), epochs,
    size, weights, out."""
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per cell")
    p.add_argument("--methods", nargs="+", choices=methods, default=list(methods), help="methods to run")
    if noise:
        p.add_argument("--noise", type=float, default=0.1, help="labeler noise of the extra rows (0: none)")
    p.add_argument("--epochs", type=int, default=3, help="passes of every method")
    p.add_argument("--image-size", type=int, default=image_size, help="input size (small, so the table fits a CPU)")
    p.add_argument("--weights", default="none", help="backbone start: none|auto|imagenet|PATH")
    p.add_argument("--out", required=True, help="folder for results.md and accuracy.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=SHARED, help="labelled folder to split into train/val (default %(default)s)")
    p.add_argument("--images", help="labelled training folder (with --val; overrides --data)")
    p.add_argument("--val", help="labelled validation folder")
    p.add_argument("--budgets", nargs="+", default=["16", "32", "64", "128", "all"],
                   help="answer budgets (numbers or 'all')")
    common_flags(p, METHODS, image_size=64)
    p.add_argument("--finetune", default="all", choices=("all", "layer4", "head"), help="what trains (RLHF rows)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dir, val_dir = (args.images, args.val) if args.images else split_folder(args.data, tmp)
        ds = ImagePool(train_dir, args.image_size)
        val = ImagePool(val_dir, args.image_size, ds.class_names)
        backbone, origin = resolve_backbone_weights(args.weights)
        budgets = [len(ds) if b == "all" else min(int(b), len(ds)) for b in args.budgets]
        rows = [(m, 0.0) for m in args.methods]
        if args.noise:
            rows += [(m, args.noise) for m in NOISY_METHODS if m in args.methods]
        results, uncertain_runs = {}, {}
        t0 = time.time()
        for method, noise in rows:
            name = method if not noise else f"{method} (noise {noise})"
            results[name] = {b: [] for b in budgets}
            for b in budgets:
                for seed in args.seeds:
                    acc, asked, rm_acc = run_method(method, ds, val, backbone, origin, args, seed, b, noise,
                                                    uncertain_runs)
                    results[name][b].append((acc, asked))
                    if rm_acc is not None:
                        results.setdefault(f"{name}: its reward model", {c: [] for c in budgets})[b].append(
                            (rm_acc, asked))
                    print(f"{name:32s} budget {b:4d} seed {seed}: val_acc {acc:.3f}  questions {asked}  reward "
                          f"model {'-' if rm_acc is None else f'{rm_acc:.3f}'}  [{time.time() - t0:.0f}s]",
                          flush=True)
                # written after every cell, so a long benchmark leaves what it finished behind
                table, header = write_results(results, budgets, len(ds), len(val), args, origin, t0)
    print(header)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
