"""Atomic writes of run files, and checkpoints that carry everything needed to rebuild the models (the run
folder itself, its lock and the runs/latest link, is run_folder.py's).

A checkpoint is one dict of tensors and plain values (nanoGPT style), so `torch.load(weights_only=True)`
reads it without executing any pickled code.
"""
import errno
import json
import os
import re
import shutil
import tempfile
from collections import namedtuple

import torch

from dataset import IMAGENET_MEAN, IMAGENET_STD
from user_errors import UserError

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
# The original script trained ants/bees at 224 px on ImageNet statistics and saved no class names.
ORIGINAL_CLASSES = ("ants", "bees")
ORIGINAL_IMAGE_SIZE = 224

# What a classifier needs from a checkpoint: the policy's weights (`model.` keys) and how to read images.
# step is None for the original script's files.
PolicySpec = namedtuple("PolicySpec", "state class_names image_size mean std name step")
# _atomic_write's temporary name: "." + the target's name + mkstemp's 8 random characters + ".tmp"
TEMP_NAME_PATTERN = re.compile(r"\..+[a-z0-9_]{8}\.tmp")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


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
    except Exception as err:  # a file that is no checkpoint fails in many ways inside torch.load
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}): "
                              "pass the checkpoint.pt of a run") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict: pass the checkpoint.pt of a run")
    return ckpt


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
        from run_folder import resolve_run_dir  # not at the top: run_folder writes through this module
        path = os.path.join(resolve_run_dir(path), CHECKPOINT_NAME)
    found = policy_spec(load_checkpoint(path), path)
    if found is None:
        raise CheckpointError(f"{path} names no classes (no class_names) and is not the original script's "
                              "{'policy_model': ...} file: pass the checkpoint.pt of a train_rlhf.py run")
    return found
