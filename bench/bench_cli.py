"""What the timing scripts of bench/ share: their common flags, and the machine printed before any figure (a
time means something only beside the CPU that measured it).

    p = bench_parser(__doc__, images=DEFAULT_IMAGES, image_size=224, rounds=5)
    args = parse_bench_args(p)       # prints the machine; refuses an --images that is not a folder
    if args.baseline_app:            # this script started again as the process it compares against
        return baseline(args)
"""
import argparse
import os
import platform
import sys

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the instructions that make bf16 faster than fp32 on a CPU
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products: what makes ONNX Runtime int8 fast


def bench_parser(doc, images, image_size, rounds):
    """A parser with the script's docstring as its help and the flags every timing script takes: --images,
    --image-size, --rounds, and the hidden --baseline-app that runs the script as its own baseline process."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=images, help="class folders of images (default %(default)s)")
    p.add_argument("--image-size", type=int, default=image_size, help="model input size in pixels")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds; medians are reported")
    p.add_argument("--baseline-app", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_bench_args(parser):
    """The flags. Unless this is the baseline process (whose output nobody reads), an --images that is not a
    folder stops the script with one line, and the machine is printed."""
    args = parser.parse_args()
    if not args.baseline_app:
        if not os.path.isdir(args.images):
            sys.exit(f"error: {args.images} is not a folder: pass --images or set RLHF_SHARED_DATA")
        print(f"machine: {machine()}", flush=True)
    return args


def machine():
    """The CPU's model (with its family and model numbers), its core count and which bf16 and int8 dot-product
    instructions it has (what decides between torch bf16 and ONNX Runtime int8), from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor speaks for all
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if fields.get("cpu family") and fields.get("model"):  # one brand name covers generations that differ
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    bf16 = [name for name in BF16_FLAGS if name in flags]
    int8 = [name for name in INT8_FLAGS if name in flags]
    return (f"{model}, {os.cpu_count()} cores, bf16 instructions: {' '.join(bf16) or 'none'}, int8 dot products: "
            f"{' '.join(int8) or 'none'}")
