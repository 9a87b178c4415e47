"""Train a ResNet18 image classifier from human feedback with PPO and a learned reward model.

    python train_rlhf.py                                   # labeling window on data/hymenoptera_data/train
    python train_rlhf.py --images DIR --feedback folder --epochs 3 --out runs/demo   # simulated labeler
    python train_rlhf.py --out runs/demo --resume          # continue; nothing already answered is asked again
    torchrun --nproc_per_node=2 train_rlhf.py --feedback folder ...   # the headless loop on 2 processes
"""
import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import time
import warnings

import torch

from checkpoint import CHECKPOINT_NAME, CheckpointError, atomic_write_json, load_checkpoint, resolve_run_dir
from data_download import DEFAULT_IMAGES, DownloadError, ensure_default_data
from dataset import AntBeeDataset, DatasetError
from ddp import Ranks, speaks_for_job, stopped_job_line
from feedback_store import FeedbackStore, StoreError
from learner import Learner, RewardModelConfig
from models import FINETUNE_CHOICES, WeightsError, resolve_backbone_weights
from ppo import PPOConfig
from rlhf_run import SKIP, RLHFRun

# Flags that decide the shape of the models or the meaning of the answers: fixed for a run's lifetime.
RUN_SHAPE = ("images", "classes", "image_size", "weights", "finetune")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", default=DEFAULT_IMAGES, help="folder of images, one subfolder per class "
                   "(default %(default)s; offered for download when missing)")
    p.add_argument("--classes", nargs="+", help="class names in key order (default: the subfolder names)")
    p.add_argument("--val", help="labelled folder (one subfolder per class) scored as val_acc in the metrics")
    p.add_argument("--out", help="run folder (default runs/rlhf__SEED__TIME; with --resume, runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or runs/latest)")
    p.add_argument("--feedback", choices=("gui", "folder"), default="gui",
                   help="who answers: the labeling window, or a simulated labeler using the class folders")
    p.add_argument("--feedback-noise", type=float, default=0.0, help="simulated labeler: P(wrong answer)")
    p.add_argument("--feedback-skip", type=float, default=0.0, help="simulated labeler: P(skip)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the image pool (total, across resumes)")
    p.add_argument("--batch-size", type=int, default=8, help="answers per PPO update")
    p.add_argument("--rm-per-update", type=int, default=8,
                   help="unanswered images trained with reward-model rewards in each update")
    p.add_argument("--no-reward-model", action="store_true",
                   help="train the policy on the person's answers only (no reward-model rewards; for comparisons)")
    p.add_argument("--max-answers", type=int, help="most questions the run may ask (default: no limit)")
    p.add_argument("--order", choices=("uncertain", "random", "sequential"), default="uncertain",
                   help="which image to ask next: the policy's least sure first (uncertain), or the epoch's "
                   "random or folder order")
    p.add_argument("--explore", type=float, default=0.1,
                   help="--order uncertain: share of questions picked at random from the unasked images")
    p.add_argument("--score-pool", type=int, default=None,
                   help="--order uncertain: unasked images scored after each update (default: all with "
                   "--finetune layer4/head, whose features are cached; 64 with --finetune all)")
    p.add_argument("--weights", default="auto", help="auto|imagenet|none|PATH: backbone initialisation")
    p.add_argument("--finetune", choices=FINETUNE_CHOICES, default="all", help="which layers train")
    p.add_argument("--image-size", type=int, default=224, help="model input size in pixels")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice: same command, same metrics")
    p.add_argument("--val-every", type=int, default=1, help="score --val every N updates (0: only at the end of each epoch)")
    p.add_argument("--checkpoint-every", type=int, default=1, help="write the checkpoint every N updates")
    p.add_argument("--download", action="store_true", help="download the default data set without asking")
    p.add_argument("--blind", action="store_true", help="labeling window: hide the model's guess")
    for cls in (PPOConfig, RewardModelConfig):
        for f in dataclasses.fields(cls):
            p.add_argument("--" + f.name.replace("_", "-"), type=FLAG_TYPES[str(f.type)], default=f.default,
                           metavar=f.name.upper(), help=f"{f.metadata['help']} (default %(default)s)")
    return p


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_optional_float(text):
    return None if text.lower() == "none" else float(text)


FLAG_TYPES = {"<class 'float'>": float, "<class 'int'>": int, "<class 'str'>": str,
              "<class 'bool'>": parse_bool, "typing.Optional[float]": parse_optional_float}


def given_flags(argv):
    """Destinations of the flags written on the command line (so --resume keeps the others)."""
    p = build_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here: use --device cpu or auto")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def prepare_run_dir(args, argv):
    """The run folder and the configuration, merged with the saved one on --resume."""
    cfg = vars(args).copy()
    if args.resume:
        run_dir = resolve_run_dir(args.out or os.path.join("runs", "latest"))
        saved = os.path.join(run_dir, "config.json")
        if not os.path.isfile(saved):
            raise UsageError(f"--resume: {run_dir} holds no run (no config.json): pass --out with a run folder")
        with open(saved, encoding="utf-8") as f:
            old = json.load(f)
        given = given_flags(argv)
        for key in RUN_SHAPE:
            if key in given and cfg[key] != old.get(key):
                raise UsageError(f"--resume: --{key.replace('_', '-')} {cfg[key]} differs from {old.get(key)} "
                                 f"in {saved}: drop the flag or start a new --out")
        cfg = {**old, **{k: v for k, v in cfg.items() if k in given}, "resume": True}
    else:
        run_dir = args.out or os.path.join("runs", f"rlhf__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.isfile(os.path.join(run_dir, "config.json")):
            raise UsageError(f"{run_dir} already holds a run: add --resume to continue it or pick a new --out")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"cannot write to run folder {run_dir} ({err.strerror}): pass a writable --out") from None
    return run_dir, cfg


class FolderLabeler:
    """Simulated person: answers with the image's class folder, wrong with P(noise), skipping with P(skip)."""

    def __init__(self, dataset, noise=0.0, skip=0.0, seed=0):
        missing = [p for p, y in zip(dataset.paths, dataset.labels) if y < 0]
        if missing:
            raise UsageError(f"--feedback folder needs every image in a class folder; {missing[0]} is not: "
                             "move it into one of " + ", ".join(dataset.class_names))
        self.labels, self.k = dataset.labels, dataset.num_classes
        self.noise, self.skip, self.seed = noise, skip, seed

    def ask(self, index, probs, sampled):
        # One draw per (seed, image): the same answers whichever process asks, in whatever order.
        rng = random.Random(f"{self.seed}:{index}")
        if rng.random() < self.skip:
            return SKIP
        if rng.random() < self.noise:
            return rng.choice([c for c in range(self.k) if c != self.labels[index]])
        return self.labels[index]


def run_headless(run, learner, ds, feedback, epochs):
    """The RLHF loop: visit every image each epoch, ask about new ones, update every batch_size answers.

    Visits are gathered until the next update is due, then the round's questions are answered together:
    the policy's guesses computed in one batch, and under torchrun each process asks the labeler about
    its block of them and the answers are shared.
    """
    for epoch in range(run.epoch, epochs):
        visits, answering = [], 0  # answering: visits of this round with an answer, given or on its way
        for index, ask in run.epoch_visits(epoch):
            visits.append(index)
            if ask:
                run.asking.add(index)
            answering += ask or run.answer_of.get(index, SKIP) is not SKIP
            if len(run.pending) + answering >= run.cfg["batch_size"]:
                answer_round(run, learner, feedback, visits)
                visits, answering = [], 0
        answer_round(run, learner, feedback, visits)
        run.finish_epoch()


def answer_round(run, learner, feedback, visits):
    """Ask about the round's new images (the guesses of the current policy), then queue every visit."""
    asks = [i for i in visits if i in run.asking]
    if asks:
        probs = learner.policy_probs(run.inputs(asks))
        sampled = learner.sample(probs).tolist()
        start, stop = learner.ranks.block(len(asks))
        mine = [feedback.ask(asks[j], probs[j], sampled[j]) for j in range(start, stop)]
        answers = [a for block in learner.ranks.gather(mine) for a in block]
        for j, index in enumerate(asks):
            run.record(index, answers[j], probs[j], sampled[j])  # committed by the process holding the store
    for index in visits:
        if run.visit(index):
            run.update()


def default_config(**overrides):
    """The configuration of a run with every flag at its default, then `overrides` (for scripts)."""
    cfg = vars(build_parser().parse_args([]))
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise KeyError(f"unknown settings: {sorted(unknown)}")
    return {**cfg, **overrides}


def on_main(ranks, fn):
    """fn() on rank 0 only; a user error it raises is raised on every process (so none waits forever)."""
    result, message = None, None
    if ranks.is_main:
        try:
            result = fn()
        except (UsageError, StoreError, DownloadError) as err:
            message = str(err)
    message = ranks.broadcast(message)
    if message is not None:
        raise UsageError(message)
    return result


def open_run(cfg, run_dir, ds, val, backbone, origin, device, ranks=None):
    """Learner, feedback store and RLHFRun for a run folder, resumed from its checkpoint when asked.
    Under torchrun only rank 0 opens the store (the others get None)."""
    ranks = ranks or Ranks()
    ppo_cfg = PPOConfig(**{f.name: cfg[f.name] for f in dataclasses.fields(PPOConfig)})
    rm_cfg = RewardModelConfig(**{f.name: cfg[f.name] for f in dataclasses.fields(RewardModelConfig)})
    learner = Learner(ds.num_classes, backbone, cfg["finetune"], ppo_cfg, rm_cfg, device, cfg["seed"], ranks)

    def open_store():
        store = FeedbackStore(os.path.join(run_dir, "feedback.sqlite"))
        store.check_classes(ds.class_names)
        store.check_image_set(ds.hashes)
        return store

    store = on_main(ranks, open_store)
    run = RLHFRun(cfg, ds, learner, store, run_dir, origin, val)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if cfg["resume"] and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("class_names") != ds.class_names:
            raise UsageError(f"{ckpt_path} was trained on classes {ckpt.get('class_names')}, not "
                             f"{ds.class_names}: pass the run's --images/--classes or a new --out")
        run.restore(ckpt)
    run.save_reference()
    if ranks.is_main:
        atomic_write_json(os.path.join(run_dir, "config.json"), cfg)
    return run, learner, store


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    gui_refused = UsageError("--feedback gui under torchrun: one person answers in one window: run "
                             "python train_rlhf.py without torchrun, or use --feedback folder")
    if Ranks.launched() and args.feedback == "gui" and not args.resume:
        raise gui_refused  # before anything is written
    ranks = Ranks.from_environment(pick_device(args.device))
    if ranks.active and pick_device(args.device) == "cuda":
        torch.cuda.set_device(ranks.local_rank)  # nccl's collectives run on the current device
    # rank 0 alone decides the folder (its default name holds the time) and checks it
    run_dir, cfg = ranks.broadcast(on_main(ranks, lambda: prepare_run_dir(args, argv)))
    if ranks.active and cfg["feedback"] == "gui":
        raise gui_refused  # --resume of a run that was labeled in the window
    if cfg["feedback"] == "gui":
        try:
            import feedback_gui  # only here, so that the headless path never imports tkinter
        except ImportError as err:
            raise UsageError(f"--feedback gui needs tkinter ({err}): install python3-tk, or use --feedback "
                             "folder (the simulated labeler)") from None
        try:
            root = feedback_gui.open_root()  # before the images load: no display fails at once
        except feedback_gui.NoDisplayError as err:
            raise UsageError(str(err)) from None
    if cfg["images"] == DEFAULT_IMAGES:
        on_main(ranks, lambda: ensure_default_data(download=cfg["download"], interactive=sys.stdin.isatty()))
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AntBeeDataset(cfg["images"], cfg["image_size"], cfg["classes"])
        val = AntBeeDataset(cfg["val"], cfg["image_size"], ds.class_names) if cfg.get("val") else None
        backbone, origin = resolve_backbone_weights(cfg["weights"])
    for w in caught if ranks.is_main else ():
        print(f"warning: {w.message}", file=sys.stderr)
    device = pick_device(cfg["device"])
    if ranks.active and device == "cuda":
        device = f"cuda:{ranks.local_rank}"
    run, learner, store = open_run(cfg, run_dir, ds, val, backbone, origin, device, ranks)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if ranks.is_main:
        answered, skipped = store.counts()
        where = f"device {device}" + (f", {ranks.world} processes" if ranks.active else "")
        print(f"run {run_dir}: {len(ds)} images, classes {ds.class_names}, weights {origin}, {where}, "
              f"{answered} answers and {skipped} skips stored, epoch {run.epoch + 1}/{cfg['epochs']}")
    else:
        run.log = lambda *_: None  # rank 0 prints the metrics for the job
    if cfg["feedback"] == "gui":  # one process: refused under torchrun above
        if feedback_gui.run_session(root, run, learner, store, cfg):
            store.close()  # training failed: the answers are stored, the last good checkpoint stays
            return 1
    else:
        feedback = FolderLabeler(ds, cfg["feedback_noise"], cfg["feedback_skip"], cfg["seed"])
        run_headless(run, learner, ds, feedback, cfg["epochs"])
    run.save()
    if ranks.is_main:
        answered, skipped = store.counts()
        print(f"done: {answered} answers, {skipped} skips, {learner.version} updates; checkpoint {ckpt_path}")
        store.close()
    ranks.close()
    return 0


def stop_on_sigterm(*_):
    """Exit 143 through the normal path; under torchrun, SIGTERM means another process of the job ended."""
    if Ranks.launched():
        print(stopped_job_line("torchrun stopped it after another process ended",
                               "every answer committed so far is in the run's feedback.sqlite; continue with "
                               "--resume"), file=sys.stderr)
    sys.exit(143)


def cli():
    # SIGTERM exits through the normal path so SQLite closes cleanly; answers are committed already.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        sys.exit(main())
    except (UsageError, DatasetError, StoreError, CheckpointError, WeightsError, DownloadError) as err:
        if speaks_for_job():  # under torchrun every process meets it; one says so
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # PeerLostError, or a failed collective inside DistributedDataParallel
        if not Ranks.launched():
            raise
        print(stopped_job_line(err, "every answer committed so far is in the run's feedback.sqlite; "
                               "continue with --resume"), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: every answer given so far is saved; continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
