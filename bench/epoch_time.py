"""A headless epoch of this tool against a supervised epoch on the same images, as whole processes, and the
share of the run spent writing checkpoints.

    python bench/epoch_time.py                              # shared digits (1,200), 32 px, 3 rounds
    python bench/epoch_time.py --images DIR --image-size 64 --rounds 5

Every round runs these three commands, interleaved, and times each from launch to exit:
  rlhf          python train_rlhf.py --images DIR --feedback folder --epochs 1 --weights none --image-size N,
                every other flag at its default (checkpoints by time: every 60 s, and at the epoch's end)
  rlhf_no_ckpt  the same with --checkpoint-seconds 1e9: the epoch end's checkpoint alone
  supervised    one pass of cross-entropy over the same images, one Adam step per --batch-size images (8: the
                baseline the speed issue set; the tool takes 24 labels per update), the same network, optimiser
                and image reading (this script with --baseline-app)
Medians over the rounds. Checkpointing's share is (rlhf - rlhf_no_ckpt) / rlhf plus one checkpoint write
(timed here, from the run's own checkpoint.pt) over rlhf.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_cli import bench_parser, parse_bench_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RLHF_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
sys.path.insert(0, ROOT)


def supervised_app(args):
    """The baseline process: read the pool as the tool does, then one pass of cross-entropy in batches of 8."""
    import torch
    import torch.nn.functional as F

    from dataset import ImagePool
    from learner import adam
    from models import PolicyModel

    torch.manual_seed(args.seed)
    ds = ImagePool(args.images, args.image_size)
    policy = PolicyModel(ds.num_classes, None)
    opt, labels = adam(policy.parameters(), 3e-4), torch.tensor(ds.labels)
    order = torch.randperm(len(ds))
    policy.train()
    for start in range(0, len(ds), args.batch_size):
        mb = order[start:start + args.batch_size]
        policy.train(len(mb) > 1)
        loss = F.cross_entropy(policy(ds.batch(mb.tolist())), labels[mb])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def one_checkpoint_write(run_dir):
    """Seconds to write the run's checkpoint once more, as the run writes it (temp file + rename)."""
    import torch

    from checkpoint import save_checkpoint
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    t0 = time.perf_counter()
    save_checkpoint(os.path.join(run_dir, "again.pt"), ckpt)
    return time.perf_counter() - t0, os.path.getsize(os.path.join(run_dir, "again.pt"))


def main():
    p = bench_parser(__doc__, images=os.path.join(SHARED, "digits", "train"), image_size=32, rounds=3)
    p.add_argument("--batch-size", type=int, default=8, help="images per step of the supervised baseline")
    p.add_argument("--seed", type=int, default=1, help="seed of both")
    p.add_argument("--json", help="also write the raw timings here")
    args = parse_bench_args(p)
    if args.baseline_app:
        return supervised_app(args)
    times = {"rlhf": [], "rlhf_no_ckpt": [], "supervised": []}
    write_s, size = [], 0
    with tempfile.TemporaryDirectory(prefix="epoch-time-") as work:
        for r in range(args.rounds):
            tool = [sys.executable, "train_rlhf.py", "--images", args.images, "--feedback", "folder", "--epochs", "1",
                    "--weights", "none", "--image-size", str(args.image_size), "--seed", str(args.seed)]
            times["rlhf"].append(timed(tool + ["--out", os.path.join(work, f"a{r}")]))
            times["rlhf_no_ckpt"].append(timed(tool + ["--out", os.path.join(work, f"b{r}"),
                                                       "--checkpoint-seconds", "1e9"]))
            times["supervised"].append(timed([sys.executable, os.path.abspath(__file__), "--baseline-app",
                                              "--images", args.images, "--image-size", str(args.image_size),
                                              "--seed", str(args.seed), "--batch-size", str(args.batch_size)]))
            seconds, size = one_checkpoint_write(os.path.join(work, f"a{r}"))
            write_s.append(seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
                  + f", one checkpoint write {seconds:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    share = (med["rlhf"] - med["rlhf_no_ckpt"] + statistics.median(write_s)) / med["rlhf"]
    print(f"\n{args.images}, {args.image_size} px, median of {args.rounds} rounds, whole processes:\n")
    print("| command | wall (median) | ratio to supervised |\n|---|---:|---:|")
    for name, value in med.items():
        print(f"| {name} | {value:.1f} s | {value / med['supervised']:.2f}x |")
    print(f"\ncheckpoint.pt {size / 1e6:.0f} MB, one write {statistics.median(write_s):.2f} s; "
          f"checkpointing's share of the default run: {share:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, "checkpoint_write_s": write_s, "checkpoint_bytes": size}, f, indent=1)


if __name__ == "__main__":
    main()
