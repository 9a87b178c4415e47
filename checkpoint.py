"""Atomic writes of run files, and checkpoints that carry everything needed to rebuild the models.

A checkpoint is one dict of tensors and plain values (nanoGPT style), so `torch.load(weights_only=True)`
reads it without executing any pickled code.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections import namedtuple

import torch

from dataset import IMAGENET_MEAN, IMAGENET_STD

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
# The original script trained ants/bees at 224 px on ImageNet statistics and saved no class names.
ORIGINAL_CLASSES = ("ants", "bees")
ORIGINAL_IMAGE_SIZE = 224

# What a classifier needs from a checkpoint: the policy's weights (`model.` keys) and how to read images.
# step is None for the original script's files.
PolicySpec = namedtuple("PolicySpec", "state class_names image_size mean std name step")
# _atomic_write's temporary name: "." + the target's name + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"\..+[a-z0-9_]{8}\.tmp")


LOCK_NAME = ".lock"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class RunLockedError(Exception):
    """Another process writes this run folder; the message names it."""


def lock_run_dir(run_dir):
    """Hold the run folder's lock for the rest of this process's life: a run folder has one writer. The
    kernel drops the lock when the process ends, kill -9 included, so a resume is never blocked by a dead
    run. Raises RunLockedError naming the process that holds it."""
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise RunLockedError(f"{run_dir} is in use by {holder}: a run folder has one writer; wait for it to "
                             "end (or stop it), or pick another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({' '.join(os.path.basename(a) for a in sys.argv[:1])})\n".encode(), 0)
    return fd  # held open: closing it would release the lock


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a run's files should read like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder):
    """Delete the temporary files that a write killed before its os.replace left in folder; returns their names.

    Call it before this process writes there: a write in flight in another process would lose its file."""
    removed = []
    for entry in os.scandir(folder):
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


def atomic_write_bytes(path, data):
    """Write a file so that readers see the old or the new content, never half of it."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    """JSON counterpart of atomic_write_bytes."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_checkpoint(path, ckpt):
    """torch.save through a temporary file and os.replace."""
    def write(f):
        try:
            torch.save(ckpt, f)
        except RuntimeError as err:  # torch's zip writer reports a failed write (a full disk) this way
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < (64 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          os.strerror(errno.ENOSPC) if full else f"write failed: {str(err).splitlines()[0]}") from None
    _atomic_write(path, write)


def load_checkpoint(path):
    """Load a checkpoint dict with weights_only=True; raises CheckpointError with the fix."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train first (python train_rlhf.py) or pass --model PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}): "
                              "pass the checkpoint.pt of a run") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict: pass the checkpoint.pt of a run")
    return ckpt


def update_latest_link(run_dir):
    """Point <parent of run_dir>/latest at run_dir (a symlink, or a text file where links fail)."""
    run_dir = os.path.abspath(run_dir)
    parent = os.path.dirname(run_dir)
    latest = os.path.join(parent, "latest")
    tmp = os.path.join(parent, f".latest.{os.getpid()}.tmp")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.basename(run_dir), tmp)
        os.replace(tmp, latest)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if os.path.isdir(latest) and not os.path.islink(latest):
            return  # a real folder named latest is a user's run: leave it alone
        atomic_write_bytes(latest, (run_dir + "\n").encode("utf-8"))


def resolve_run_dir(path):
    """A run folder from a run folder, a `latest` link or a `latest` text file."""
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.path.realpath(path)


def policy_spec(ckpt, path):
    """The policy of a checkpoint dict: this tool's, or the original script's {'policy_model': ...}; None
    when it holds neither (a plain state dict). Raises CheckpointError for a malformed one."""
    if isinstance(ckpt.get("policy"), dict) and ckpt.get("class_names"):
        size = ckpt.get("image_size", ORIGINAL_IMAGE_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096:
            raise CheckpointError(f"{path}: image_size {size!r} is not a size in pixels (16 to 4096): "
                                  "pass the checkpoint.pt of a train_rlhf.py run")
        norm = ckpt.get("normalization") or {}
        return PolicySpec(ckpt["policy"], [str(c) for c in ckpt["class_names"]], size,
                          tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD)),
                          os.path.basename(os.path.dirname(os.path.abspath(path))), ckpt.get("step"))
    if isinstance(ckpt.get("policy_model"), dict):
        return PolicySpec(ckpt["policy_model"], list(ORIGINAL_CLASSES), ORIGINAL_IMAGE_SIZE, IMAGENET_MEAN,
                          IMAGENET_STD, os.path.basename(path), None)
    return None


def read_policy(spec=None):
    """The PolicySpec of a checkpoint file, a run folder or a `latest` link (default runs/latest)."""
    path = spec or os.path.join("runs", "latest")
    if os.path.isdir(path) or os.path.basename(path) == "latest":
        if not os.path.lexists(path):
            raise CheckpointError(f"no trained model yet ({path} does not exist): train first: "
                                  "python train_rlhf.py (or pass --model PATH)")
        path = os.path.join(resolve_run_dir(path), CHECKPOINT_NAME)
    found = policy_spec(load_checkpoint(path), path)
    if found is None:
        raise CheckpointError(f"{path} names no classes (no class_names) and is not the original script's "
                              "{'policy_model': ...} file: pass the checkpoint.pt of a train_rlhf.py run")
    return found
