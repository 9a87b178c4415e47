"""Fetch the default data set (PyTorch's hymenoptera ants/bees archive) into data/, verified first.

The archive is checked before anything is extracted: every file under hymenoptera_data/train/ is
hashed from inside the zip and the combined digest must equal TRAIN_DIGEST, computed from a known-good
copy of the training half (245 files: 244 photos and one GIF placeholder).
"""
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile

from user_errors import UserError

DATA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DATA_DIR = "data"
DEFAULT_IMAGES = os.path.join(DATA_DIR, "hymenoptera_data", "train")
TRAIN_PREFIX = "hymenoptera_data/train/"
TRAIN_FILES = 245
TRAIN_DIGEST = "c0a83c7b4f99a5b800a9039abfaf12415f4491982b0f83153e4e03763e0d5d01"


class DownloadError(UserError):
    """The default data could not be had; the message says what to pass instead."""


def train_digest(named_contents):
    """Combined SHA-256 over (path, SHA-256 of content) pairs, in sorted path order."""
    h = hashlib.sha256()
    for name, data in sorted(named_contents):
        h.update(name.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def verify_archive(zip_path):
    """Raise DownloadError unless the archive's training half is exactly the known one."""
    with zipfile.ZipFile(zip_path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()
                   if i.filename.startswith(TRAIN_PREFIX) and not i.is_dir()]
    if len(members) != TRAIN_FILES or train_digest(members) != TRAIN_DIGEST:
        raise DownloadError(f"{zip_path} does not match the known hymenoptera archive (checksum): "
                            "delete it, or pass --images DIR with your own images")


def safe_extract(zip_path, dest):
    """Extract, refusing members that would land outside dest."""
    dest_abs = os.path.realpath(dest)
    with zipfile.ZipFile(zip_path) as z:
        for name in z.namelist():
            target = os.path.realpath(os.path.join(dest_abs, name))
            if not target.startswith(dest_abs + os.sep):
                raise DownloadError(f"{zip_path} has an unsafe member {name!r}: pass --images DIR instead")
        z.extractall(dest_abs)


def ensure_default_data(download=False, interactive=False, timeout=30.0):
    """Make sure data/hymenoptera_data/train exists, downloading it when allowed."""
    if os.path.isdir(DEFAULT_IMAGES):
        return DEFAULT_IMAGES
    if not download:
        if not interactive:
            raise DownloadError(f"the default image folder {DEFAULT_IMAGES} is missing: pass --images DIR, "
                                "or --download to fetch the ants/bees set")
        reply = input(f"{DEFAULT_IMAGES} is missing. Download the ants/bees set (47 MB) from {DATA_URL}? [y/N] ")
        if reply.strip().lower() not in ("y", "yes"):
            raise DownloadError("no images: pass --images DIR with a folder of images")
    os.makedirs(DATA_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=DATA_DIR, suffix=".zip.part")
    os.close(fd)
    try:
        print(f"downloading {DATA_URL} ...")
        try:
            with urllib.request.urlopen(DATA_URL, timeout=timeout) as resp, open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f)
        except OSError as err:  # a timeout too
            raise DownloadError(f"could not download {DATA_URL} ({err}): you seem to be offline; "
                                "pass --images DIR with a folder of images") from None
        try:
            verify_archive(tmp)
        except zipfile.BadZipFile:
            raise DownloadError(f"{DATA_URL} did not return a zip archive: pass --images DIR instead") from None
        safe_extract(tmp, DATA_DIR)
    finally:
        os.unlink(tmp)
    print(f"extracted to {os.path.join(DATA_DIR, 'hymenoptera_data')}")
    return DEFAULT_IMAGES
