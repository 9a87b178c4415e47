"""The run folder: its one-writer lock, the runs/latest link, finding a run folder, cleaning up after killed
writes, keeping outputs off a run's files, and RunFiles, which writes the run's files (metrics, checkpoint,
reference, training data, config).

    lock_run_dir("runs/demo")              # held until this process ends; RunLockedError when another holds it
    update_latest_link("runs/demo")        # runs/latest now names runs/demo
    resolve_run_dir("runs/latest")         # the folder it names
    check_output_path("out.csv", "--csv", inputs)   # OutputPathError if it would replace an input or a run's file
"""
import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import sys

from checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    TEMP_NAME_PATTERN,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    path_length_problem,
    save_checkpoint,
    shortened,
)
from hash_cache import HASH_CACHE_NAME
from user_errors import UserError

LOCK_NAME = ".lock"
REFERENCE_NAME = "reference.pt"
# The files a run keeps in its folder, SQLite's companions and the decoded caches (decoded_cache_name) included:
# never links, so that a write there cannot land in a file elsewhere.
OWN_FILE = re.compile("|".join(map(re.escape, (LOCK_NAME, "config.json", CHECKPOINT_NAME, REFERENCE_NAME,
                                               "metrics.jsonl", "training_data.json")))
                      + r"|(feedback\.sqlite|" + re.escape(HASH_CACHE_NAME) + r")(-wal|-shm|-journal)?|decoded-.+\.u8"
                      + r"|" + re.escape(CHECKPOINT_NAME) + r"\.[0-9a-f]+\.onnx")
# what each metrics line prints beside update, epoch and answers
METRICS_SHOWN = (("mean_reward", "reward {:+.2f}"), ("agreement", "agree {:.2f}"), ("approx_kl", "kl {:.4f}"),
                 ("rm_acc", "rm_acc {:.2f}"), ("rm_weight", "rm_w {:.2f}"), ("flip_rate", "flip {:.3f}"),
                 ("val_acc", "val_acc {:.3f}"), ("update_s", "{:.2f}s"))


class RunLockedError(UserError):
    """Another process writes this run folder; the message names it when it can."""


class RunFolderError(UserError):
    """A run folder whose own files are links or special files; the message names the file."""


class OutputPathError(UserError):
    """An output path that would replace an input image or a run's own file; the message names the fix."""


def lock_run_dir(run_dir):
    """Hold the run folder's lock for the rest of this process's life: a run folder has one writer. The
    kernel drops the lock when the process ends, kill -9 included, so a resume is never blocked by a dead
    run. Raises RunLockedError (naming the process that holds it) and RunFolderError (check_own_files)."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        check_own_files(run_dir)  # names a .lock that is a link, a folder or a pipe, which no folder fix helps
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = lock_holder(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise RunLockedError(f"{run_dir} is in use by {holder or 'another program'}: a run folder has one "
                             "writer; wait for it to end (or stop it), or pick another --out") from None
    check_own_files(run_dir)  # after the lock: no run of ours changes the folder while it is looked at
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({' '.join(os.path.basename(a) for a in sys.argv[:1])})\n".encode(), 0)
    return fd  # held open: closing it would release the lock


def lock_holder(fd):
    """The process that a held .lock names ("process 123 (train_rlhf.py)"), when that process holds the lock;
    None for a dead run's id left in the file, or a lock taken by another program."""
    text = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    named = re.match(r"process (\d+)\b", text)
    if not named:
        return None
    pid = named.group(1)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            locks = [line.split() for line in f if "->" not in line]  # "->": a waiter, not a holder
    except OSError:  # no /proc (macOS): a live process of that id is the best evidence there is
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
        return text
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5309915 0 EOF": the pid, and the inode after the device
    inode = str(os.fstat(fd).st_ino)
    held = any(len(f) > 5 and f[1] == "FLOCK" and f[4] == pid and f[5].rsplit(":", 1)[-1] == inode for f in locks)
    return text if held else None


def check_own_files(run_dir):
    """Refuse a run folder whose own files (OWN_FILE) are links or special files: a write through them would
    land in a file elsewhere (RunFolderError)."""
    for entry in os.scandir(run_dir):
        if OWN_FILE.fullmatch(entry.name) and not entry.is_file(follow_symlinks=False):
            what = "a symbolic link" if entry.is_symlink() else "not a regular file"
            raise RunFolderError(f"{entry.path} is {what}: a run folder's own files must be plain files, so "
                                 "that no write lands elsewhere; replace it with a plain copy (or remove it), or "
                                 "pick another --out")


def is_run_folder(folder):
    """A folder that holds a run: its config.json beside feedback.sqlite or .lock."""
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.lexists(os.path.join(folder, name)) for name in ("feedback.sqlite", LOCK_NAME))


def check_output_path(path, flag, inputs=()):
    """Refuse an output path (of flag) that is one of the input files or lies in a run folder, at any depth:
    writing it would replace an image or a run's own file (OutputPathError). A link to such a file counts. A path
    too long for any folder to help is OutputPathError too, naming the limit."""
    too_long = path_length_problem(path)
    if too_long:
        raise OutputPathError(f"{flag} {shortened(path)}: {too_long}")
    try:
        target = os.stat(path)
    except OSError:
        target = None
    if target is not None and stat.S_ISREG(target.st_mode):
        for f in inputs:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.stat(f), target):
                    raise OutputPathError(f"{flag} {path} is the input {f}: writing it would replace that file; "
                                          "pass an output path that is none of the inputs")
    starts = {os.path.dirname(os.path.realpath(path)), os.path.realpath(os.path.dirname(os.path.abspath(path)))}
    if os.path.isdir(path):  # an ImageFolder export's target
        starts.add(os.path.realpath(path))
    for start in starts:
        folder = start
        while True:
            if is_run_folder(folder):
                raise OutputPathError(f"{flag} {path} lies in the run folder {folder}: writing there could "
                                      "replace the run's own files; pass a path outside it")
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent


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


def remove_stale_temp_files(folder):
    """Delete the temporary files that a write killed before its os.replace left in folder; returns their names.

    Call it before this process writes there: a write in flight in another process would lose its file."""
    removed = []
    for entry in os.scandir(folder):
        if TEMP_NAME_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


class RunFiles:
    """The files a run writes in its folder: metrics.jsonl (and its printed line), checkpoint.pt, reference.pt,
    training_data.json and config.json. Only the main process writes (`writes`); every write is atomic or an
    append, and a failed one is one line that says nothing the person gave is lost."""

    def __init__(self, run_dir, writes=True, log=print):
        self.run_dir, self.writes, self.log = run_dir, writes, log

    def path(self, name):
        return os.path.join(self.run_dir, name)

    @contextlib.contextmanager
    def writing(self, path):
        """An OSError while writing a run file (a full disk) as one line; nothing the person gave is lost."""
        try:
            yield
        except OSError as err:
            raise CheckpointError(f"cannot write {path} ({err.strerror or err}): free space on its disk or fix "
                                  "its permissions; every answer is in feedback.sqlite and the last good "
                                  "checkpoint is kept: continue with --resume") from None

    def write_metrics(self, metrics):
        """One line of metrics.jsonl, and its short form printed."""
        if not self.writes:
            return
        path = self.path("metrics.jsonl")
        with self.writing(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # a link: ELOOP
            with open(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        parts = [f"update {metrics['update']:4d}", f"epoch {metrics['epoch']}", f"answers {metrics['answers']}"]
        for key, fmt in METRICS_SHOWN:
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        self.log("  ".join(parts))

    def save_checkpoint(self, ckpt, feature_cache=None):
        """checkpoint.pt (and the feature cache's new entries), then runs/latest names this run."""
        path = self.path(CHECKPOINT_NAME)
        with self.writing(path):
            save_checkpoint(path, ckpt)
            if feature_cache is not None:
                feature_cache.save()
            update_latest_link(self.run_dir)

    def save_reference(self, policy_state):
        """reference.pt, once, when the run starts: the KL reference never changes afterwards."""
        path = self.path(REFERENCE_NAME)
        if self.writes and not os.path.isfile(path):
            with self.writing(path):
                save_checkpoint(path, {"format_version": FORMAT_VERSION, "policy": policy_state})

    def load_reference(self):
        """The reference policy's state dict, or None for a run without reference.pt."""
        path = self.path(REFERENCE_NAME)
        return load_checkpoint(path)["policy"] if os.path.isfile(path) else None

    def write_training_data(self, episodes, answer_rows, class_names):
        """training_data.json, the original script's export: episodes and the answers by image path."""
        feedback = {row["path"]: row["answer"] for row in answer_rows if row["answer"] is not None}
        path = self.path("training_data.json")
        with self.writing(path):
            atomic_write_json(path, {"episodes": episodes, "human_feedback": feedback,
                                     "class_names": list(class_names)})

    def write_config(self, flat):
        """config.json: every setting of the run; --resume reads it back."""
        if self.writes:
            path = self.path("config.json")
            with self.writing(path):
                atomic_write_json(path, flat)
