"""ResNet18 on CPU with its input in channels-last memory (what models.cpu_eval_layout does for eval-mode
forwards) against the default layout: scoring a batch in eval mode, and one training step (forward, backward,
Adam), interleaved, random inputs and initial weights.

    python bench/eval_layout.py                                # 32 px, eval batches of 24 and 256, 30 repeats
    python bench/eval_layout.py --image-size 224 --eval-batches 32 --repeats 10

Prints milliseconds (medians after 5 warm-up repeats) and the default layout's time over channels-last's.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cli import machine  # noqa: E402
from learner import adam  # noqa: E402
from models import PolicyModel  # noqa: E402

WARMUP = 5


def median_ms(times):
    return 1e3 * statistics.median(times[WARMUP:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=32, help="input size in pixels (default %(default)s)")
    p.add_argument("--eval-batches", type=int, nargs="+", default=[24, 256],
                   help="eval-mode batch sizes timed (default %(default)s)")
    p.add_argument("--train-batch", type=int, default=24, help="training step's batch (default %(default)s)")
    p.add_argument("--classes", type=int, default=10, help="output classes (default %(default)s)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats of each, after 5 warm-up ones")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads", flush=True)
    torch.manual_seed(0)
    layouts = {"default": torch.contiguous_format, "channels_last": torch.channels_last}
    nets = {}
    for name in layouts:
        torch.manual_seed(0)
        net = PolicyModel(args.classes, None)
        nets[name] = (net, adam(net.parameters(), 3e-4))
    s = args.image_size
    xs = {b: torch.randn(b, 3, s, s) for b in args.eval_batches}
    x, y = torch.randn(args.train_batch, 3, s, s), torch.randint(0, args.classes, (args.train_batch,))
    times = {(name, what): [] for name in layouts for what in [*args.eval_batches, "train"]}
    for _ in range(WARMUP + args.repeats):
        for name, layout in layouts.items():
            net, opt = nets[name]
            net.eval()
            for b, xb in xs.items():  # net.model: the layout given here, not the one PolicyModel.forward picks
                t0 = time.perf_counter()
                with torch.inference_mode():
                    net.model(xb.contiguous(memory_format=layout))
                times[name, b].append(time.perf_counter() - t0)
            net.train()
            t0 = time.perf_counter()
            loss = F.cross_entropy(net.model(x.contiguous(memory_format=layout)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[name, "train"].append(time.perf_counter() - t0)
    print(f"{args.image_size} px | default layout | channels-last input | default / channels-last")
    for what in [*args.eval_batches, "train"]:
        label = f"eval, batch {what}" if what != "train" else f"training step, batch {args.train_batch}"
        a, b = median_ms(times["default", what]), median_ms(times["channels_last", what])
        print(f"{label} | {a:.1f} ms | {b:.1f} ms | {a / b:.2f}x")


if __name__ == "__main__":
    main()
