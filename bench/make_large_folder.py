"""A folder of N distinct photos made from the shared ants/bees photos: crops, flips and re-encoding.

    python bench/make_large_folder.py --count 10000 --out /tmp/large-10000
    python bench/make_large_folder.py --count 100000 --out /tmp/large-100000 --workers 2

Image i is photo i mod P (P photos in --source) cropped to a seeded 60-100% of its sides, flipped on odd
variants, scaled so its longer side is 500 px (the shared photos' size) and saved as JPEG at a seeded quality
of 70-95, in the source's class folder. Every file has its own content, so content hashes do not collapse.
An existing folder with the same count is left as it is (the bench calls this before each measurement).
"""
import argparse
import os
import random
import sys
from multiprocessing import Pool

from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset import list_image_files

DEFAULT_SOURCE = os.path.join(os.environ.get("RLHF_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                              "hymenoptera_data", "train")
LONG_SIDE = 500


def make_variant(job):
    """Write variant number i of the source photo to dest (a JPEG)."""
    i, source, dest = job
    rng = random.Random(i)
    with Image.open(source) as img:
        img = img.convert("RGB")
    w, h = img.size
    cw, ch = round(w * rng.uniform(0.6, 1.0)), round(h * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    scale = LONG_SIDE / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    tmp = dest + ".tmp"
    img.save(tmp, "JPEG", quality=rng.randint(70, 95))
    os.replace(tmp, dest)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, required=True, help="images to make")
    p.add_argument("--out", required=True, help="folder to make (class subfolders inside)")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="class folders of photos to vary")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes encoding in parallel")
    args = p.parse_args()
    if not os.path.isdir(args.source):
        sys.exit(f"error: {args.source} is not a folder: pass --source DIR or set RLHF_SHARED_DATA")
    sources = list_image_files(args.source)
    jobs = []
    for i in range(args.count):
        src = sources[i % len(sources)]
        cls = os.path.relpath(src, args.source).split(os.sep)[0]
        dest = os.path.join(args.out, cls, f"{i:07d}.jpg")
        if not os.path.isfile(dest):
            jobs.append((i, src, dest))
    for cls in {os.path.relpath(s, args.source).split(os.sep)[0] for s in sources}:
        os.makedirs(os.path.join(args.out, cls), exist_ok=True)
    with Pool(max(1, args.workers)) as pool:
        for done, _ in enumerate(pool.imap_unordered(make_variant, jobs, chunksize=64), 1):
            if done % 1000 == 0:
                print(f"\r{done}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    print(f"{args.out}: {args.count} images ({len(jobs)} made now)")


if __name__ == "__main__":
    main()
