"""ResNet18's training step and scoring forward at small sizes with three ways of computing its convolutions, in
one process, interleaved: nn.Conv2d everywhere; models.OnePixelConv2d with its kernel taps taken by autograd's own
slice and reshape (how it was first written); and models.OnePixelConv2d as it is (models.KernelTaps).

    python bench/conv_step.py                          # 32 px, 1 and 2 threads, 40 rounds
    python bench/conv_step.py --threads 2 --rounds 80

A step is forward, backward and a fused Adam step on random images (batches of 8 and 32, the supervised baseline's
and the tool's); a forward is one eval-mode batch of 64, as the ranking of the unasked scores. Medians per cell,
and KernelTaps' ratio to the slice taps, from the same rounds.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_cli import machine
from models import OnePixelConv2d, PolicyModel


class SliceTapsConv2d(OnePixelConv2d):
    """OnePixelConv2d as first written: the taps by slice + reshape, whose copies autograd makes."""

    def forward(self, x):
        (h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], self.kernel_size, self.stride, self.padding
        if not (0 <= h + 2 * ph - kh < sh and 0 <= w + 2 * pw - kw < sw):
            return torch.nn.Conv2d.forward(self, x)
        h, w = min(h, kh - ph), min(w, kw - pw)
        weight = self.weight[:, :, ph:ph + h, pw:pw + w].reshape(self.out_channels, -1)
        return F.linear(x[:, :, :h, :w].reshape(x.shape[0], -1), weight, self.bias)[:, :, None, None]


VARIANTS = {"nn.Conv2d": torch.nn.Conv2d, "slice taps": SliceTapsConv2d, "KernelTaps (today)": OnePixelConv2d}


def network(conv_class, classes=10):
    torch.manual_seed(0)
    net = PolicyModel(classes)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.__class__ = conv_class
    return net, torch.optim.Adam(net.parameters(), 3e-4, fused=True)


def step(net, opt, x, y):
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def forward(net, x):
    net.eval()
    with torch.no_grad():
        net(x)


def measure(threads, size, rounds):
    """{(cell, variant): median seconds} of `rounds` interleaved rounds on `threads` threads."""
    torch.set_num_threads(threads)
    nets = {name: network(cls) for name, cls in VARIANTS.items()}
    cells = {f"step, batch {n}": (lambda net, opt, x=torch.randn(n, 3, size, size), y=torch.randint(0, 10, (n,)):
                                  step(net, opt, x, y)) for n in (8, 32)}
    cells["forward, batch 64"] = lambda net, opt, x=torch.randn(64, 3, size, size): forward(net, x)
    times = {}
    for cell, run in cells.items():
        for net, opt in nets.values():  # warm-up: oneDNN's first call per shape
            run(net, opt)
        for _ in range(rounds):
            for name, (net, opt) in nets.items():
                t0 = time.perf_counter()
                run(net, opt)
                times.setdefault((cell, name), []).append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=32, help="input size in pixels (layer4's maps are 1x1 at 32)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one table each")
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds; medians are reported")
    args = p.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}; {args.image_size} px", flush=True)
    names = list(VARIANTS)
    for threads in args.threads:
        med = measure(threads, args.image_size, args.rounds)
        print(f"\n{threads} thread(s), medians of {args.rounds}\n")
        print("| cell | " + " | ".join(names) + " | KernelTaps / slice taps |")
        print("|---|" + "---:|" * (len(names) + 1))
        for cell in dict.fromkeys(c for c, _ in med):
            ms = [med[(cell, n)] * 1e3 for n in names]
            print(f"| {cell} | " + " | ".join(f"{m:.1f} ms" for m in ms) + f" | {ms[2] / ms[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
