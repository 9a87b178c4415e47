"""Atomic writes of run files, and checkpoints that carry everything needed to rebuild the models (the run
folder itself, its lock and the runs/latest link, is run_folder.py's).

A checkpoint is one dict of tensors and plain values (nanoGPT style), so `torch.load(weights_only=True)`
reads it without executing any pickled code.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections import namedtuple

from dataset import IMAGENET_MEAN, IMAGENET_STD
from user_errors import UserError

# How text the tool writes is encoded: a file name that is not UTF-8 (os gives it as surrogates) goes back to
# its own bytes, so a path in a CSV names the very file.
FILE_NAME_BYTES = "surrogateescape"
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


# What _atomic_write adds to a name for its temporary file: "." before it, mkstemp's 8 characters and ".tmp"
TEMP_NAME_EXTRA = 13
# Limits where the system cannot say (a folder on a file system that does not answer pathconf)
NAME_MAX, PATH_MAX = 255, 4096


def length_limits(path):
    """(longest name, longest path) in bytes where path would be made: the file system's own limits."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX") - 1  # -1: the final NUL
    except (OSError, ValueError):
        return NAME_MAX, PATH_MAX - 1


def path_length_problem(path, room=TEMP_NAME_EXTRA):
    """What makes path impossible to create on this system, with the fix, or None: a name (of the file or of a
    folder on the way) longer than the file system allows, or a whole path longer than the system takes once the
    tool adds room bytes below it (its temporary names). The OS says only "File name too long" for both, and
    no writable folder helps with either."""
    name_max, path_max = length_limits(path)
    given, full = os.fsencode(path), os.fsencode(os.path.abspath(path))
    # the components as given count too: the kernel reads each one, even one that a later ".." cancels
    last = full.rstrip(b"/").rsplit(b"/", 1)[-1]
    for part in given.split(b"/") + full.split(b"/"):
        if len(part) > name_max:
            which = "its name" if part == last else f"the folder name {shortened(os.fsdecode(part))}"
            return (f"{which} is {len(part)} bytes and a file or folder name is at most {name_max} bytes here: "
                    "pass a shorter name")
    if max(len(given), len(full)) + room > path_max:
        return (f"the path is {len(full)} bytes and a path is at most {path_max - room} bytes here: pass a shorter "
                "path (fewer or shorter folders)")
    return None


def shortened(text, keep=40):
    """text as one line to show in a message: its start and end when it is long, a line break written as \\n or
    \\r, any byte that is not UTF-8 as \\xNN."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep // 2:]}"


def temp_prefix(name, name_max=NAME_MAX):
    """The prefix of a temporary file for name: "." + name, cut so that the temporary name stays within
    name_max bytes (a name near the limit is valid, and its temporary file must be too)."""
    limit = name_max - TEMP_NAME_EXTRA
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return "." + name


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    name_max = length_limits(path)[0]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(os.path.basename(path), name_max), suffix=".tmp")
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
    """Write a file so that readers see the old or the new content, never half of it; a device, a pipe or
    /dev/stdout is written into as a stream, never replaced by a file."""
    if is_stream(path):
        write_stream(path, data)
    else:
        _atomic_write(path, lambda f: f.write(data))


def is_stream(path):
    """True for an existing target that is not a regular file or folder (a device, a FIFO, a terminal), or that
    lies in /dev or /proc (/dev/stdout, /dev/fd/N even when they lead to a file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    top = os.path.realpath(os.path.dirname(os.path.abspath(path))).split(os.sep)[1:2]
    return not stat.S_ISDIR(mode) and (not stat.S_ISREG(mode) or top in (["dev"], ["proc"]))


def write_stream(path, data):
    """Write data into a device, FIFO or pipe; a reader that has gone (head -1) ends the writing, not the run.
    A FIFO that nobody reads is an OSError (ENXIO), not a hang."""
    target = os.stat(path)
    std = next((n for n in (1, 2) if _is_fd(n, target)), None)
    if std is not None:  # our own stdout redirected to a file: write at the shell's offset, not over the top
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        fd = os.dup(std)
    else:
        trunc = os.O_TRUNC if stat.S_ISREG(target.st_mode) else 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | trunc)  # non-blocking: no hang
        except OSError as err:
            if err.errno == errno.ENXIO and stat.S_ISFIFO(target.st_mode):
                raise OSError(errno.ENXIO, "a FIFO that no process reads") from None
            raise
        os.set_blocking(fd, True)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass  # the reader read what it wanted
    finally:
        os.close(fd)


def _is_fd(fd, target):
    try:
        return os.path.samestat(os.fstat(fd), target)
    except OSError:  # that descriptor is closed
        return False


def atomic_write_json(path, obj):
    """JSON counterpart of atomic_write_bytes."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_checkpoint(path, ckpt):
    """torch.save through a temporary file and os.replace."""
    import torch  # here: run folders are checked before torch is loaded (the window's first image)

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
    import torch
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
