"""Classify images with a trained policy: a window to look at one image at a time, or a batch CLI.

    python inference.py                                  # window with the newest run's model (runs/latest)
    python inference.py --model runs/NAME --open DIR     # window showing DIR; arrow keys browse it
    python inference.py photo.jpg more_photos/           # table of predictions, folders searched recursively
    python inference.py DIR --csv out.csv                # or --json out.json: path, class, every probability
    python inference.py DIR --model rlhf_models.pth      # a checkpoint written by the original script
    python inference.py DIR --backend torch              # torch, whichever engine measured faster (bf16 possible)
    torchrun --nproc_per_node=2 inference.py DIR --csv out.csv   # split over 2 processes, one CSV

Exit code 0 when at least one image was classified, 2 on bad input or when none could be.
"""
import argparse
import os
import sys
import time

from tqdm import tqdm

from batch_classifier import (
    BACKENDS,
    InferenceError,
    check_writable,
    classify_files,
    list_inputs,
    load_for_flags,
    print_table,
    shard_files,
    write_csv,
    write_json,
)
from dataset import IMAGE_EXTENSIONS
from ddp import Ranks, pick_device
from run_folder import check_output_path
from std_streams import guard_standard_streams
from user_errors import exit_as_promised


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("paths", nargs="*", metavar="IMG_OR_DIR",
                   help="images or folders (searched recursively) to classify; none: open the window")
    p.add_argument("--model", help="checkpoint file or run folder (default runs/latest); also the original "
                   "script's rlhf_models.pth")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="OUT.csv", help="write path, predicted class and every probability as CSV")
    out.add_argument("--json", metavar="OUT.json", help="write the same as a JSON list")
    p.add_argument("--open", metavar="IMG_OR_DIR", help="window: show this image or folder at start")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes (default %(default)s; 0: decode in the main process)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engine that runs the model: auto (default): on the CPU with --precision auto, ONNX Runtime "
                   "(the model exported once per checkpoint, kept beside it; fp32 or int8, see --precision) or "
                   "torch, whichever measured faster on this machine (once, cached); ONNX Runtime with --precision "
                   "fp32 or int8, torch with bf16; torch on CUDA, and where ONNX Runtime is missing")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                   help="auto (default): on torch, bf16 where it measured faster than fp32 on this machine; on ONNX "
                   "Runtime, int8 where it measured faster and kept every probability within 0.02 of fp32's on 64 "
                   "images spread over the job (32 others calibrate it; a class may change where fp32's two "
                   "likeliest are that close), else fp32 (measured once per machine and checkpoint, kept in "
                   "~/.cache/rlhf-imgcls or $RLHF_CACHE_DIR; a job under 96 images runs fp32). bf16 is torch's, "
                   "int8 ONNX Runtime's (the batch CLI's only): with --backend auto each picks its engine")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the batch CLI runs the model (default cpu; auto: CUDA when available)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.paths and args.open:
        raise InferenceError("--open is for the window: drop it to classify IMG_OR_DIR, or drop IMG_OR_DIR")
    if not args.paths:
        return open_window(args)
    if args.batch_size < 1 or args.workers < 0:
        raise InferenceError("--batch-size must be at least 1 and --workers at least 0")
    files = list_inputs(args.paths)
    if not files:
        raise InferenceError(f"no images found in {' '.join(args.paths)} ({' '.join(IMAGE_EXTENSIONS)}): "
                             "pass image files or folders that hold them")
    flag, out = ("--csv", args.csv) if args.csv else ("--json", args.json)
    if out:
        check_output_path(out, flag, files + ([args.model] if args.model and os.path.isfile(args.model) else []))
        check_writable(out, flag)
    clf, engine, precision = load_for_flags(args.model, args.backend, args.precision, pick_device(args.device),
                                          files)
    ranks = Ranks.from_environment(pick_device(args.device))
    device = pick_device(args.device, ranks)
    if device.startswith("cuda") and ranks.active:
        import torch  # the CPU path may run on ONNX Runtime alone
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    mine = shard_files(files, args.batch_size, ranks)
    # a bar only where it helps: a job longer than two batches, on a terminal (disable=None keeps it out of
    # logs), erased when done
    shown = len(mine) > 2 * args.batch_size and ranks.is_main
    with tqdm(total=len(mine), unit=" images", file=sys.stderr, leave=False, disable=None if shown else True) as bar:
        rows = classify_files(clf, mine, args.batch_size, args.workers, precision, device.split(":")[0], progress=bar)
    rows = [r for part in ranks.gather(rows) for r in part]  # rank order is file order
    seconds = time.perf_counter() - t0
    ranks.close()
    if not ranks.is_main:
        return 0
    done = [r for r in rows if r["error"] is None]
    for r in (r for r in rows if r["error"]):
        print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    if not done:
        raise InferenceError(f"none of the {len(files)} file(s) could be read as an image (see above): "
                             "pass JPEG, PNG or other image files")
    if out:
        try:
            (write_csv if args.csv else write_json)(rows, out)
        except OSError as err:
            raise InferenceError(f"cannot write {flag} {out} ({err.strerror}): pass a writable path") from None
    else:
        print_table(done, clf.class_names)
    counts = ", ".join(f"{c} {sum(r['predicted'] == c for r in done)}" for c in clf.class_names)
    print(f"{len(done)} of {len(files)} images classified ({counts}), {len(rows) - len(done)} unreadable; "
          f"{len(done) / seconds:.1f} images/s, {engine} {precision}, model {clf.name}"
          + (f", {ranks.world} processes" if ranks.active else "")
          + (f"; wrote {out}" if out else ""))
    return 0


def open_window(args):
    """The window, for a command line without images."""
    if args.csv or args.json:
        raise InferenceError("--csv/--json need images: python inference.py IMG_OR_DIR ... --csv out.csv")
    if Ranks.launched():
        raise InferenceError("the window is one process: run python inference.py without torchrun, or "
                             "pass IMG_OR_DIR to classify files")
    if args.precision == "int8":
        raise InferenceError("--precision int8 is for the batch CLI (it calibrates on a job's images): drop it "
                             "to open the window")
    from inference_window import run_window  # tkinter only for the window
    return run_window(args.model, args.open, args.precision, args.backend)


def cli():
    guard_standard_streams()
    exit_as_promised(main, "nothing was written; run it again")


if __name__ == "__main__":
    cli()
