"""Auto-labels against the truth: coverage (auto rows / unanswered images) and true error of `--autolabel`'s rows
against the stated bound, for MAX_ERROR 0.01, 0.02, 0.05 and several answer budgets, on the shared digits.

    python bench/autolabel.py --out bench/out/autolabel                       # the table in docs/benchmarks.md
    python bench/autolabel.py --budgets 150 --seeds 0 --verdict-budgets --out /tmp/al   # a quick look
    python bench/autolabel.py --budgets 150 300 600 1200 2400 --device cuda   # on a GPU

Each run is the tool's headless run on the whole pool (`--image-size 32 --weights none --feedback folder
--max-answers N --epochs 3`, random init): `--ask label` at --budgets, `--ask verdict` at --verdict-budgets, one
per seed. The pool's unanswered images are the test set: their class folders are the truth, which the run never
saw. A run folder under OUT whose checkpoint has done its 3 epochs is reused, and one stopped early is resumed,
so a sitting cut short is continued. The calibration and the served model's scores are computed once per run
(autolabel.py, as the export does) and kept beside it (RUN.scores.json; --rescore applies a changed threshold
rule to them); the threshold is chosen for each MAX_ERROR; the truth is read only to score the rows, never to
choose.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from autolabel import (
    calibration_pairs,
    choose_threshold,
    open_served_run,
    served_rows,
    training_rows,
    unanswered_images,
)
from bench_cli import machine
from checkpoint import CHECKPOINT_NAME, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(os.path.dirname(ROOT), "shared", "data", "digits", "train")
EPOCHS = 3
RUN_FLAGS = ("--image-size", "32", "--weights", "none", "--feedback", "folder", "--epochs", str(EPOCHS))


def run_folder(args, mode, budget, seed):
    """The finished run folder of one cell, trained now when OUT has none."""
    run_dir = os.path.join(args.out, f"{mode}-{budget}-s{seed}")
    log = run_dir + ".log"
    ckpt = os.path.join(run_dir, CHECKPOINT_NAME)
    if os.path.isfile(ckpt) and load_checkpoint(ckpt)["epoch"] >= EPOCHS:  # a run stopped early has fewer
        return run_dir
    cmd = [sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", args.images, *RUN_FLAGS,
           "--max-answers", str(budget), "--seed", str(seed), "--ask", mode, "--device", args.device, "--out", run_dir]
    if os.path.isdir(run_dir):
        cmd.append("--resume")  # a run cut short continues where it stopped
    with open(log, "a", encoding="utf-8") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return run_dir


def run_scores(run_dir):
    """The run's cross-fitted calibration pairs, the served policy's and the reward model's top class and
    probability on each unanswered image, and the truth; computed once and kept beside the run folder, so that
    a threshold rule can be scored again without fitting anything."""
    path = run_dir.rstrip(os.sep) + ".scores.json"
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    run = open_served_run(run_dir)
    try:
        rows = training_rows(run)
        pairs = calibration_pairs(run, rows)
        unanswered = unanswered_images(run)
        scored = served_rows(run, unanswered, 0.0)  # every unanswered image with its probability and class
        truth = {r["sha1"]: run.ds.class_names[run.ds.labels[run.index_of[r["sha1"]]]] for r in scored}
        # beside the served policy, for comparison only: the run's reward model at the same threshold
        rm = run.learner.rm_probs(run.inputs([run.index_of[r["sha1"]] for r in scored]))
        rm_rows = [(float(q.max()), run.ds.class_names[int(q.argmax())], r["sha1"]) for q, r in zip(rm, scored)]
    finally:
        run.ds.close()
    out = {"answers": len({r[0] for r in rows}), "pairs": pairs, "truth": truth, "rm_rows": rm_rows,
           "scored": [{"sha1": r["sha1"], "class": r["class"], "probability": r["probability"]} for r in scored]}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def score_run(run_dir, max_errors):
    """One result per MAX_ERROR: the threshold, its bound and what it rests on, coverage and true error."""
    got = run_scores(run_dir)
    pairs, scored, truth, rm_rows = got["pairs"], got["scored"], got["truth"], got["rm_rows"]
    out = []
    for m in max_errors:
        cal = choose_threshold([c for c, _ in pairs], [ok for _, ok in pairs], m)
        auto = [r for r in scored if cal.threshold is not None and r["probability"] >= cal.threshold]
        wrong = sum(r["class"] != truth[r["sha1"]] for r in auto)
        rm_auto = [(c, s) for p, c, s in rm_rows if cal.threshold is not None and p >= cal.threshold]
        rm_wrong = sum(c != truth[s] for c, s in rm_auto)
        out.append({"max_error": m, "threshold": cal.threshold, "bound": cal.bound if cal.threshold else None,
                    "best_bound": cal.best_bound, "cal_above": cal.above, "cal_errors": cal.errors,
                    "answers": got["answers"], "unanswered": len(scored), "auto": len(auto),
                    "wrong": wrong, "coverage": len(auto) / max(1, len(scored)),
                    "true_error": wrong / len(auto) if auto else None, "rm_auto": len(rm_auto),
                    "rm_true_error": rm_wrong / len(rm_auto) if rm_auto else None})
    return out


def table(cells):
    """The markdown table of the cells, one line per run and MAX_ERROR."""
    lines = ["| run | answers | MAX_ERROR | threshold | calibration (wrong / above) | bound | auto / unanswered "
             "| coverage | true error | reward model instead: coverage, true error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        thr = f"{c['threshold']:.3f}" if c["threshold"] is not None else "none"
        bound = f"{c['bound']:.3f}" if c["bound"] is not None else f"(best {c['best_bound']:.3f})"
        err = f"{c['true_error']:.3f}" if c["true_error"] is not None else "-"
        flag = " **over**" if c["true_error"] is not None and c["true_error"] > c["max_error"] else ""
        cal = (f"{c['cal_errors']} / {c['cal_above']} of {c['answers']}" if c["threshold"] is not None
               else f"- of {c['answers']}")
        lines.append(f"| {c['mode']} s{c['seed']} | {c['budget']} | {c['max_error']} | {thr} | {cal} | {bound} | "
                     f"{c['auto']} / {c['unanswered']} | "
                     f"{c['coverage']:.2f} | {err}{flag} | {c['rm_auto'] / max(1, c['unanswered']):.2f}, "
                     f"{rate(c['rm_true_error'])} |")
    return "\n".join(lines)


def plot(cells, path):
    """Coverage and true error against the budget, one line per MAX_ERROR (label runs, mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in sorted({c["max_error"] for c in cells}):
        own = [c for c in cells if c["max_error"] == m and c["mode"] == "label"]
        budgets = sorted({c["budget"] for c in own})
        ax1.plot(budgets, [mean([c["coverage"] for c in own if c["budget"] == b]) for b in budgets], "o-",
                 label=f"MAX_ERROR {m}")
        for c in own:
            if c["true_error"] is not None:
                ax2.scatter(c["budget"], c["true_error"], color=f"C{sorted({x['max_error'] for x in cells}).index(m)}")
        ax2.axhline(m, linestyle="--", color=f"C{sorted({x['max_error'] for x in cells}).index(m)}")
    ax1.set(xlabel="answers (label mode)", ylabel="coverage: auto rows / unanswered", xscale="log", ylim=(0, 1))
    ax2.set(xlabel="answers (label mode)", ylabel="true error of the auto rows (each seed)", xscale="log")
    ax1.legend()
    ax2.set_title("dashed: the stated MAX_ERROR", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def rate(x):
    return "-" if x is None else f"{x:.3f}"


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=DIGITS, help="pool: one subfolder per class (default the shared digits)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "autolabel"))
    p.add_argument("--budgets", type=int, nargs="*", default=[150, 300, 600], help="label-mode answer budgets")
    p.add_argument("--verdict-budgets", type=int, nargs="*", default=[150], help="verdict-mode budgets")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-errors", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "autolabel.png"))
    p.add_argument("--rescore", action="store_true",
                   help="score the planned runs again from their kept scores (after a change to the threshold rule)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cells_path = os.path.join(args.out, "cells.jsonl")
    done = {}
    if os.path.isfile(cells_path):
        with open(cells_path, encoding="utf-8") as f:
            for line in f:
                c = json.loads(line)
                done[(c["mode"], c["budget"], c["seed"], c["max_error"])] = c
    # the cheapest cells first, so a sitting cut short leaves whole budgets
    plan = [(mode, b, s) for b in sorted(set(args.budgets) | set(args.verdict_budgets))
            for mode in ("label", "verdict") if b in (args.budgets if mode == "label" else args.verdict_budgets)
            for s in args.seeds]
    print(f"{machine()}; {datetime.date.today()}")
    for mode, budget, seed in plan:
        todo = [m for m in args.max_errors if args.rescore or (mode, budget, seed, m) not in done]
        if not todo:
            continue
        for c in score_run(run_folder(args, mode, budget, seed), todo):
            c.update(mode=mode, budget=budget, seed=seed)
            done[(mode, budget, seed, c["max_error"])] = c
        print(f"{mode} {budget} seed {seed}: scored", flush=True)
    with open(cells_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in done.values())
    os.replace(cells_path + ".tmp", cells_path)
    cells = [done[(mode, b, s, m)] for mode, b, s in plan for m in args.max_errors if (mode, b, s, m) in done]
    print(table(cells))
    plot(cells, args.plot)


if __name__ == "__main__":
    main()
