"""Images per second of inference.py's batch path against a one-image-at-a-time baseline, in one run.

    python bench/inference_speed.py                         # ants/bees train folder, random-init model, 224 px
    python bench/inference_speed.py --images DIR --repeats 5 --model runs/latest
    python bench/inference_speed.py --whole-process         # whole processes: default flags, torch, onnxruntime
    python bench/inference_speed.py --whole-process --no-baseline   # the two backends alone (a busy machine)

The baseline is the original design: for every image, build the torchvision transform, decode the whole
file, and run the model on a batch of one in fp32. inference.classify_files is timed end to end (listing
excluded, DataLoader workers, decoding, forward, softmax) in fp32 and bf16; each figure is the median of
--repeats rounds (variants interleaved) after a warm-up on a few images. Prints a markdown table and
the bf16-vs-fp32 agreement.
The baseline runs a copy of the same network, BatchNorm already folded, so the comparison is conservative.

A random-init network predicts the same class for every image, which would make the agreement trivially
100%; its head's bias is therefore centred on the folder's mean logits, so the images split between the
classes and many sit close to the decision boundary, a harder test of bf16 than a trained model.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import onnx_engine
from batch_classifier import Classifier, classify_files, list_inputs, load_classifier, pick_precision
from bench_cli import machine
from dataset import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize
from models import PolicyModel, fold_batchnorm

BASELINE = "baseline: one image at a time, fp32"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data", "hymenoptera_data", "train")


def baseline_classify(net, path, image_size, class_names):
    """The original design: a fresh transform and a full decode per image, batch of one, fp32."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(net(x), dim=1)[0]
    return class_names[int(probs.argmax())]


def bench_classifier(model, files):
    """The checkpoint's classifier, or a random-init one whose head is centred on these images (so that
    both classes are predicted and the agreement figures mean something)."""
    if model:
        return load_classifier(model)
    torch.manual_seed(0)
    net = fold_batchnorm(PolicyModel(2).eval()).to(memory_format=torch.channels_last)
    clf = Classifier(net, ["ants", "bees"], 224, IMAGENET_MEAN, IMAGENET_STD, "random-init, centred head", 0)
    sample = normalize(torch.stack([load_image(f, clf.image_size) for f in files[::max(1, len(files) // 64)]]))
    with torch.no_grad():
        clf.net.model.fc.bias -= clf.net(sample.to(memory_format=torch.channels_last)).mean(0)
    return clf


def loop_app(args):
    """The baseline as a whole process: load the checkpoint, then one image at a time (--loop-app)."""
    clf = load_classifier(args.model)
    net = copy.deepcopy(clf.net).to(memory_format=torch.contiguous_format)
    files = list_inputs([args.images])
    t0 = time.perf_counter()
    for f in files:
        baseline_classify(net, f, clf.image_size, clf.class_names)
    print(f"loop {time.perf_counter() - t0:.3f} s")  # the loop in process: start-up and model loading excluded


def whole_process(args):
    """`python inference.py DIR --csv` with default flags, --backend torch and --backend onnxruntime against the
    one-at-a-time loop as a process of its own (and its loop alone, timed inside it), over --copies hard-linked
    copies of the folder; medians of --repeats rounds, after one untimed round (it makes the ONNX export and
    measures the engines)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="inference-speed-") as work:
        files = list_inputs([args.images])
        for c in range(args.copies):
            for i, f in enumerate(files):
                os.makedirs(os.path.join(work, "images", str(c)), exist_ok=True)
                os.link(f, os.path.join(work, "images", str(c), f"{i}_{os.path.basename(f)}"))
        folder, model = os.path.join(work, "images"), args.model or os.path.join(work, "model.pt")
        if not args.model:
            clf = bench_classifier(None, files)  # seed 0, BatchNorm folded, head centred on these images
            torch.manual_seed(0)
            state = PolicyModel(2).state_dict()
            state["model.fc.bias"] = clf.net.model.fc.bias.detach().clone()
            torch.save({"format_version": 1, "policy": state, "class_names": clf.class_names, "image_size": 224,
                        "step": 0}, model)
        n = len(list_inputs([folder]))
        cli = [sys.executable, os.path.join(ROOT, "inference.py"), folder, "--model", model, "--csv"]
        cmds = {} if args.no_baseline else {"one image at a time (process)": [
            sys.executable, os.path.abspath(__file__), "--loop-app", "--images", folder, "--model", model]}
        variants = {"inference.py (default flags)": [], "inference.py --backend torch": ["--backend", "torch"],
                    "inference.py --backend onnxruntime --precision fp32": ["--backend", "onnxruntime",
                                                                           "--precision", "fp32"],
                    "inference.py --precision int8": ["--precision", "int8"]}
        csvs = {name: os.path.join(work, f"out{i}.csv") for i, name in enumerate(variants)}
        cmds.update({name: cli + [csvs[name]] + flags for name, flags in variants.items()})
        times, said, loop = {name: [] for name in cmds}, {}, []
        for r in range(-1, args.repeats):  # round -1 is untimed
            for name, cmd in cmds.items():
                t0 = time.perf_counter()
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if r >= 0:
                    times[name].append(time.perf_counter() - t0)
                said[name] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
                if r >= 0 and said[name].startswith("loop "):
                    loop.append(float(said[name].split()[1]))
            if r >= 0:
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
        agreed = agreement(csvs["inference.py --backend onnxruntime --precision fp32"],
                           csvs["inference.py --precision int8"])
    base = statistics.median(times[list(cmds)[0]])
    print(f"\n| whole process ({n} images, 224 px, {machine()}) | wall (median) | images/s | "
          f"speed-up vs {list(cmds)[0]} |\n|---|---:|---:|---:|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.1f} s | {n / med:.1f} | {base / med:.2f}x |")
    if loop:  # the baseline: the one-at-a-time loop in process, without its start-up
        print(f"| one image at a time, the loop alone (in process) | {statistics.median(loop):.1f} s | "
              f"{n / statistics.median(loop):.1f} | - |")
        print("\nwhole-process CLI against the in-process loop: " + ", ".join(
            f"{name} {statistics.median(loop) / statistics.median(t):.2f}x" for name, t in times.items()
            if name.startswith("inference.py")))
    for name in cmds:
        if name.startswith("inference.py"):
            print(f"{name}: {said[name]}")
    print(agreed)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime_version()}")


def agreement(fp32_csv, int8_csv):
    """How the int8 engine's CSV agrees with the fp32 one's: same class, largest probability change."""
    import csv
    rows = []
    for path in (fp32_csv, int8_csv):
        with open(path, newline="", encoding="utf-8") as f:
            rows.append(list(csv.DictReader(f)))
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(*rows))
    diff = max(abs(float(a[k]) - float(b[k])) for a, b in zip(*rows) for k in a if k not in ("path", "predicted"))
    return f"int8 against fp32, all {len(rows[0])} images: the same class on {same}, probabilities within {diff:.4f}"


def onnxruntime_version():
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return onnxruntime.__version__


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=SHARED, help="folder to classify (default %(default)s)")
    p.add_argument("--model", help="checkpoint or run folder (default: random-init ResNet18, 2 classes, 224 px)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over every variant; medians are reported")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batched path")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--whole-process", action="store_true", help="time whole processes instead: inference.py "
                   "with its default flags against the one-at-a-time loop run as a process")
    p.add_argument("--copies", type=int, default=3, help="--whole-process: hard-linked copies of the folder")
    p.add_argument("--no-baseline", action="store_true", help="leave out the one-at-a-time loop (slow on a busy "
                   "machine)")
    p.add_argument("--loop-app", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loop_app:
        return loop_app(args)
    if args.whole_process:
        return whole_process(args)

    files = list_inputs([args.images])
    clf = bench_classifier(args.model, files)
    base_net = copy.deepcopy(clf.net).to(memory_format=torch.contiguous_format)
    n = len(files)
    print(f"{n} images from {args.images}, {clf.image_size} px, model {clf.name}, {torch.get_num_threads()} "
          f"torch threads, {machine()}, --precision auto picks {pick_precision('auto', clf)}, "
          f"torch {torch.__version__}", flush=True)

    def baseline(some):
        return [baseline_classify(base_net, f, clf.image_size, clf.class_names) for f in some]

    ort = onnx_classifier(clf)

    def batched(some, precision, c=clf):
        return [r["predicted"] for r in classify_files(c, some, args.batch_size, args.workers, precision)]

    def bare(precision):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            return clf.net(x)

    x = torch.randn(args.batch_size, 3, clf.image_size, clf.image_size).to(memory_format=torch.channels_last)
    x_np = x.contiguous().numpy()
    runs = {} if args.no_baseline else {BASELINE: (lambda: baseline(files), lambda: baseline(files[:8]))}
    for prec in ("fp32", "bf16"):
        runs[f"classify_files, batch {args.batch_size}, {args.workers} workers, torch {prec}"] = (
            lambda prec=prec: batched(files, prec), lambda prec=prec: batched(files[:2 * args.batch_size], prec))
    runs[f"classify_files, batch {args.batch_size}, {args.workers} workers, onnxruntime fp32"] = (
        lambda: batched(files, "fp32", ort), lambda: batched(files[:2 * args.batch_size], "fp32", ort))
    for prec in ("fp32", "bf16"):
        runs[f"bare forward pass only, batch {args.batch_size}, torch {prec}, channels-last"] = (
            lambda prec=prec: bare(prec),) * 2
    runs[f"bare forward pass only, batch {args.batch_size}, onnxruntime fp32"] = (
        lambda: ort.net.session.run(None, {ort.net.input: x_np}),) * 2
    for _, warm_up in runs.values():
        warm_up()
    # Round-robin rather than one variant after the other: load from other processes on a shared machine
    # then hits every variant alike instead of whichever happened to run during a busy minute.
    times, preds = {name: [] for name in runs}, {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.repeats):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            preds[name] = fn()
            times[name].append(time.perf_counter() - t0)
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{(args.batch_size if 'bare' in k else n) / v[-1]:.1f}" for k, v in times.items()), flush=True)
    report(times, preds, clf, n, args, load_before)


def onnx_classifier(clf):
    """The same classifier on ONNX Runtime, exported in memory."""
    meta = {"image_size": clf.image_size, "mean": list(clf.mean), "std": list(clf.std)}
    return clf._replace(net=onnx_engine.export_policy(clf.net, meta)[0])


def report(times, preds, clf, n, args, load_before):
    """The markdown table of medians and speed-ups, and how far the paths agree."""
    median = {name: statistics.median(t) for name, t in times.items()}
    base_s = median.get(BASELINE)
    fp32 = next(v for k, v in preds.items() if k.startswith("classify_files") and k.endswith("torch fp32"))

    print(f"\n| path ({n} images, {clf.image_size} px) | images/s | speed-up vs baseline |")
    print("|---|---:|---:|")
    for name, seconds in median.items():
        bare_pass = name.startswith("bare")
        print(f"| {name} | {(args.batch_size if bare_pass else n) / seconds:.1f} | "
              f"{'-' if bare_pass or base_s is None else f'{base_s / seconds:.2f}x'} |")
    agree = {other: f"{sum(a == b for a, b in zip(fp32, preds[other])) / n:.1%}" for other in preds
             if other not in (BASELINE,) and not other.startswith("bare") and preds[other] is not fp32}
    if base_s is not None:
        agree[BASELINE] = f"{sum(a == b for a, b in zip(fp32, preds[BASELINE])) / n:.1%}"
    print(f"\nmedian of {args.repeats} rounds; torch fp32 batched agrees with: {agree}; fp32 predictions per class: "
          f"{ {c: fp32.count(c) for c in clf.class_names} }; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; onnxruntime {onnxruntime_version()}")


if __name__ == "__main__":
    main()
