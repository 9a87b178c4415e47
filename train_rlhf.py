"""Train a ResNet18 image classifier from human feedback with PPO and a learned reward model.

    python train_rlhf.py                                   # labeling window on data/hymenoptera_data/train
    python train_rlhf.py --images DIR --feedback folder --epochs 3 --out runs/demo   # simulated labeler
    python train_rlhf.py --out runs/demo --resume          # continue; nothing already answered is asked again
    python train_rlhf.py --out runs/demo --export labels.csv   # the run's labels (.jsonl, or DIR/ as an ImageFolder)
    python train_rlhf.py --out runs/demo --export labels.csv --autolabel 0.02   # and auto labels, at most 2% wrong
    python train_rlhf.py --images DIR --import-labels labels.csv   # labels given elsewhere count as answered
    torchrun --nproc_per_node=2 train_rlhf.py --feedback folder ...   # the headless loop on 2 processes

This script parses the flags (run_config.py), prepares the run folder and starts the loop (rlhf_run.py)
with the labeling window or the simulated labeler.
"""
import ctypes
import gc
import glob
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings

from checkpoint import CHECKPOINT_NAME, path_length_problem, shortened
from data_download import DEFAULT_IMAGES, ensure_default_data
from dataset import ImagePool, class_folders, hide_pillow_size_warning, relative_path
from label_transfer import export_labels, read_label_source
from run_config import PER_INVOCATION, RUN_SHAPE, RunConfig
from run_folder import check_output_path, lock_run_dir, remove_stale_temp_files, resolve_run_dir
from simulated_labeler import FolderLabeler
from std_streams import guard_standard_streams
from user_errors import UserError, exit_as_promised, first_line, launched_by_torchrun, stopped_job_line

# torch and the modules built on it (ddp, models, rlhf_run, feedback_gui) are imported where they are used: the
# labeling window shows its first image while they load (first_images.py)
GUI_UNDER_TORCHRUN = ("--feedback gui under torchrun: one person answers in one window: run python train_rlhf.py "
                      "without torchrun, or use --feedback folder")


class UsageError(UserError):
    """Flags that do not fit together or a run folder that does not fit them; the message names the fix."""


def same_setting(given, saved):
    """True when a flag given on --resume names what the run saved: a folder or file the same place
    however it is reached (through a link, say)."""
    if given == saved:
        return True
    if isinstance(given, str) and isinstance(saved, str) and os.path.exists(given):
        return os.path.realpath(given) == os.path.realpath(saved)
    return False


def read_saved_config(saved):
    """The settings dict of a run's config.json; UsageError for a file that is not a JSON object."""
    try:
        with open(saved, encoding="utf-8") as f:
            values = json.load(f)
        why = "JSON, but not an object of settings"
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not JSON, or not UTF-8
        values, why = None, err.strerror if isinstance(err, OSError) else f"not JSON: {first_line(err)}"
    if not isinstance(values, dict):
        raise UsageError(f"--resume: {saved} is not a run's settings ({why}): put back the run's config.json or "
                         "start a new --out (the answers in its feedback.sqlite are kept)")
    return values


def resumed_config(cfg, argv, run_dir):
    """The saved configuration of the run in run_dir, overridden by the flags given now."""
    saved = os.path.join(run_dir, "config.json")
    if not os.path.isfile(saved):
        raise UsageError(f"--resume: {run_dir} holds no run (no config.json): pass --out with a run folder")
    old = RunConfig.from_flat(read_saved_config(saved), saved).to_flat()
    given, now = RunConfig.given_flags(argv), cfg.to_flat()
    for key in RUN_SHAPE:
        if key in given and not same_setting(now[key], old[key]):
            raise UsageError(f"--resume: --{key.replace('_', '-')} {now[key]} differs from {old[key]} "
                             f"in {saved}: drop the flag or start a new --out")
    keep = {k: v for k, v in old.items() if k not in given and k not in PER_INVOCATION}
    return RunConfig.from_flat({**now, **keep, "out": run_dir, "resume": True}, saved)


def lock_folder(run_dir):
    """Create run_dir if needed, lock it for this process and check it is writable; returns whether this
    call created it (a failed start then removes it)."""
    too_long = path_length_problem(run_dir, room=64)  # room for the run's own files and temporary names
    if too_long:  # no folder would help: say so, not "pass a writable --out"
        raise UsageError(f"--out {shortened(run_dir)}: {too_long}")
    created = not os.path.isdir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock_run_dir(run_dir)
        # a new name each time (O_EXCL): a link planted under a fixed name would be followed and its target
        # truncated; named like checkpoint.py's temporary files, so a stray one is removed on --resume
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise UsageError(f"cannot write to run folder {run_dir} ({err.strerror}): pass a writable --out") from None
    return created


def prepare_run_dir(cfg, argv):
    """The run folder, locked for this process, the configuration (merged with the saved one on --resume;
    image folders made absolute, so a resume works from any folder) and whether this call created it."""
    cfg = cfg.replace(images=os.path.abspath(cfg.images), val=cfg.val and os.path.abspath(cfg.val))
    if cfg.resume:
        run_dir = resolve_run_dir(cfg.out or os.path.join("runs", "latest"))
        if not os.path.isdir(run_dir):
            raise UsageError(f"--resume: {run_dir} holds no run (no such folder): pass --out with a run folder")
        created = lock_folder(run_dir)
        cfg = resumed_config(cfg, argv, run_dir)
        for name in remove_stale_temp_files(run_dir):
            print(f"warning: removed {name}, left in {run_dir} by a write that was killed", file=sys.stderr)
        return run_dir, cfg, created
    run_dir = cfg.out or os.path.join("runs", f"rlhf__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    created = lock_folder(run_dir)  # first: of two runs started at once on one folder, one gets it
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UsageError(f"{run_dir} already holds a run: add --resume to continue it or pick a new --out")
    return run_dir, cfg, created


def check_val(ds, val):
    """Refuse a --val folder with none of the pool's classes (val_acc would be NaN); warn about class folders
    of it that the pool lacks (their images are not scored) and about a --val that is the pool itself."""
    other = sorted(set(class_folders([relative_path(p, val.root) for p in val.paths])) - set(ds.class_names))
    if all(label < 0 for label in val.labels):
        val.close()
        ds.close()
        raise UsageError(f"--val {val.root} has none of the classes of {ds.root} {ds.class_names} (its class "
                         f"folders: {other}): pass a --val folder with one subfolder per class of the pool")
    if other:
        warnings.warn(f"--val {val.root}: class folders {other} are not classes of {ds.root}: their images are "
                      "not scored in val_acc", stacklevel=3)
    if os.path.realpath(val.root) == os.path.realpath(ds.root):
        warnings.warn(f"--val {val.root} is the --images folder: val_acc scores the images the run learns from, "
                      "not how it does on new ones; pass a folder of other images", stacklevel=3)


def load_pool(cfg, ranks, run_dir, scanned=None):
    """The image pool, the validation set and the backbone weights; warnings printed once (rank 0). Their
    content hashes and decoded images are cached in run_dir: rank 0 scans and creates the cache files first,
    then the other processes find every file's hash there and share the decoded cache. scanned: the labeling
    window's scan of --images, so the folder is not listed twice."""
    from models import resolve_backbone_weights
    fetch_default_images(cfg, ranks)

    # A new folder's files are read for their content hashes in the background, so the first question waits
    # for one image, not the folder; under torchrun every process needs them all before the first round,
    # and --import-labels matches its rows by them.
    background = not ranks.active and not cfg.import_labels

    def read_pools():
        ds = ImagePool(cfg.images, cfg.image_size, cfg.classes, cache_dir=run_dir, hash_in_background=background,
                       scanned=scanned)
        val = ImagePool(cfg.val, cfg.image_size, ds.class_names, cache_dir=run_dir,
                        cache_tag="val") if cfg.val else None
        if val is not None:
            check_val(ds, val)
        return ds, val

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_pillow_size_warning()
        pools = ranks.on_main(read_pools, (UserError,), share=False)
        ds, val = pools if ranks.is_main else read_pools()
        backbone, origin = resolve_backbone_weights(cfg.weights)
    for w in caught if ranks.is_main else ():
        print(f"warning: {w.message}", file=sys.stderr)
    return ds, val, backbone, origin


def fetch_default_images(cfg, ranks=None):
    """The default images, offered for download when missing (a question on a terminal): before the window."""
    if os.path.abspath(cfg.images) == os.path.abspath(DEFAULT_IMAGES):
        asks = sys.stdin is not None and sys.stdin.isatty()  # None: started with stdin closed (<&-)

        def fetch():
            return ensure_default_data(download=cfg.download, interactive=asks)

        if ranks is None:
            fetch()
        else:
            ranks.on_main(fetch, (UserError,))


def check_window_classes(ds):
    """The window answers with one digit key per class: refuse a pool it cannot label."""
    if ds.num_classes > 10:
        raise UsageError(f"--feedback gui answers with the keys 0-9, one per class, and {ds.root} has "
                         f"{ds.num_classes} classes: label at most 10 classes at a time (--classes), or use "
                         "--feedback folder")


def start(cfg, run_dir, ranks, device, label_rows=None, window=False, scanned=None):
    """Everything before the first question: the simulated labeler (none for the window), the pool (from the
    window's scan, where given), the RLHFRun (with the rows of --import-labels stored)."""
    import torch

    from rlhf_run import open_run
    if ranks.active and cfg.feedback == "gui":
        raise UsageError(GUI_UNDER_TORCHRUN)  # --resume of a run that was labeled in the window
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ds, val, backbone, origin = load_pool(cfg, ranks, run_dir, scanned)
    if window:
        check_window_classes(ds)
    # built before anything is written, as it refuses a pool it cannot answer for
    labeler = None if window else FolderLabeler(ds, cfg.feedback_noise, cfg.feedback_skip, cfg.seed, cfg.noise_kind)
    return labeler, open_run(cfg, run_dir, ds, val, backbone, origin, device, ranks, label_rows)


def load_torch_libraries():
    """dlopen torch's C libraries (and torchvision's) without holding the interpreter lock: ctypes lets go of it
    in a foreign call, an import's dlopen does not. The import that follows finds them loaded. Best effort: a
    library not found is left to the import."""
    try:
        torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
        vision = importlib.util.find_spec("torchvision")
        libc = ctypes.CDLL(None)
    except (AttributeError, ImportError, OSError, TypeError):
        return
    libc.dlopen.restype, libc.dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    # global_deps first, with RTLD_GLOBAL, as torch's own loader does; libtorch_python pulls in the rest
    paths = [os.path.join(torch_dir, "lib", name) for name in ("libtorch_global_deps.so", "libtorch_python.so")]
    if vision is not None and vision.origin:
        paths += sorted(glob.glob(os.path.join(os.path.dirname(vision.origin), "*.so")))
    for path in paths:
        if os.path.isfile(path):
            libc.dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_GLOBAL)


class RunLoader(threading.Thread):
    """Imports torch and opens the run in the background while the window shows its first images."""

    def __init__(self, cfg, run_dir, label_rows, scanned=None):
        super().__init__(name="rlhf-loader", daemon=True)
        self.cfg, self.run_dir, self.label_rows, self.scanned = cfg, run_dir, label_rows, scanned
        self.value, self.error = None, None

    def run(self):
        # Both below hold the interpreter lock for a few hundred milliseconds at a time, and the window's keys
        # would wait for it: a full collection over the heap that importing torch builds, and the import's
        # loading of torch's C libraries (done here first, through a call that lets go of the lock).
        gc.disable()
        try:
            load_torch_libraries()
            from ddp import Ranks, pick_device
            ranks = Ranks()
            device = pick_device(self.cfg.device, ranks)
            _, run = start(self.cfg, self.run_dir, ranks, device, self.label_rows, window=True, scanned=self.scanned)
            import feedback_gui  # noqa: F401  (its imports, here rather than on the window's thread)
            self.value = run, device
        except BaseException as err:  # raised again on the window's thread by result()
            self.error = err
        finally:
            gc.freeze()  # what loading made is kept for the session: no later collection walks it
            gc.enable()

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


def stored(store):
    """What the store holds, in words: answers, skips and verdicts."""
    (answered, skipped), (yes, no), imported = store.counts(), store.verdict_counts(), len(store.imported())
    return (f"{answered} answers" + (f" ({imported} imported)" if imported else "") + f", {skipped} skips"
            + (f", {yes} yes and {no} no verdicts" if yes + no else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = RunConfig.from_args(argv)
    if cfg.export:  # reads the run, takes no lock: a labeling session may hold it
        check_output_path(cfg.export, "--export")
        print(export_labels(resolve_run_dir(cfg.out or os.path.join("runs", "latest")), cfg.export, cfg.autolabel))
        return 0
    if launched_by_torchrun():
        return torchrun_job(cfg, argv)
    # a label file that cannot be read stops the start before anything is written
    label_rows = cfg.import_labels and read_label_source(cfg.import_labels)
    run_dir, cfg, created = prepare_run_dir(cfg, argv)
    if cfg.feedback == "gui":
        return label_in_window(cfg, run_dir, created, label_rows)
    from ddp import Ranks
    return headless(cfg, run_dir, created, label_rows, Ranks())


def torchrun_job(cfg, argv):
    """The headless loop as one process of a torchrun job: rank 0 decides and locks the run folder."""
    import torch

    from ddp import Ranks, pick_device
    if cfg.feedback == "gui" and not cfg.resume:
        raise UsageError(GUI_UNDER_TORCHRUN)  # before anything is written
    ranks = Ranks.from_environment(pick_device(cfg.device))
    device = pick_device(cfg.device, ranks)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    label_rows = cfg.import_labels and ranks.on_main(lambda: read_label_source(cfg.import_labels),
                                                     (UserError,), share=False)
    # rank 0 alone decides the folder (its default name holds the time), checks and locks it
    run_dir, cfg, created = ranks.on_main(lambda: prepare_run_dir(cfg, argv), (UserError,))
    return headless(cfg, run_dir, created, label_rows, ranks, device)


def headless(cfg, run_dir, created, label_rows, ranks, device=None):
    """The loop with the simulated labeler, until its epochs are done or a signal stops it."""
    from ddp import pick_device
    from rlhf_run import run_headless
    try:
        device = device or pick_device(cfg.device, ranks)
        labeler, run = start(cfg, run_dir, ranks, device, label_rows)
    except BaseException:
        if created and ranks.is_main:  # a failed start leaves no half-made run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    announce(run, run_dir, device, ranks)
    code = 0 if run_headless(run, labeler, stop=lambda: SIGNALLED[0] != 0) else 128 + SIGNALLED[0]
    return finish(run, run_dir, code, ranks)


def label_in_window(cfg, run_dir, created, label_rows):
    """The labeling window: its first images are shown and answered while torch and the run load."""
    from first_images import FirstImages, open_root
    first = None
    try:
        fetch_default_images(cfg)
        root = open_root()  # display.NoDisplayError is a UserError: one line, exit 2
        first = FirstImages(root, cfg, run_dir, stop=lambda: SIGNALLED[0] != 0)
        run, device = first.wait(RunLoader(cfg, run_dir, label_rows, first.scanned))
    except BaseException:
        kept = first.answers if first is not None else []
        if kept:  # answers are never thrown away with a failed start
            print(f"warning: the {len(kept)} answers given while the model loaded are kept in "
                  f"{os.path.join(run_dir, 'feedback.sqlite')}: start again with --out {run_dir}", file=sys.stderr)
        elif created:  # a failed start leaves no half-made run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    from ddp import Ranks
    announce(run, run_dir, device, Ranks())
    first.hand_over(run)
    if first.quitting or SIGNALLED[0]:  # asked to stop while the model loaded: save what there is
        root.destroy()
        return finish(run, run_dir, 128 + SIGNALLED[0] if SIGNALLED[0] else 0, Ranks())
    import feedback_gui
    return finish(run, run_dir, feedback_gui.run_session(root, run), Ranks())


def announce(run, run_dir, device, ranks):
    """The line that says what the run is about to do (rank 0)."""
    if ranks.is_main:
        where = f"device {device}" + (f", {ranks.world} processes" if ranks.active else "")
        bad = f" ({len(run.ds.unreadable)} unreadable)" if run.ds.unreadable else ""
        print(f"run {run_dir}: {len(run.ds)} images{bad}, classes {run.ds.class_names}, weights {run.weights_origin}, "
              f"{where}, {stored(run.store)} stored, epoch {run.epoch + 1}/{run.cfg.epochs}", flush=True)


def finish(run, run_dir, code, ranks):
    """Save and close after the loop: 1 (training failed) keeps the last good checkpoint instead."""
    if code == 1:
        run.ds.close()
        run.store.close()  # training failed: the answers are stored, the last good checkpoint stays
        return 1
    run.save_if_changed()
    run.ds.close()  # what the background reading has read stays in the run's hash cache
    if ranks.is_main:
        print(f"done: {stored(run.store)}, {run.learner.version} updates; checkpoint "
              f"{os.path.join(run_dir, CHECKPOINT_NAME)}")
        run.store.close()
    ranks.close()
    return code  # 128 + the signal's number when a signal ended the window (after saving)


SIGNALLED = [0]  # the signal that asked the headless loop to stop (0: none)


def stop_on_signal(signum, frame):
    """Ctrl-C or kill: the headless loop stops after the running update and saves; a second signal, or any
    under torchrun (where SIGTERM means another process of the job ended), exits at once."""
    if launched_by_torchrun():
        print(stopped_job_line("torchrun stopped it after another process ended",
                               "every answer committed so far is in the run's feedback.sqlite; continue with "
                               "--resume"), file=sys.stderr)
        sys.exit(128 + signum)
    if SIGNALLED[0]:
        sys.exit(128 + signum)
    SIGNALLED[0] = signum


def cli():
    # a warning printed while the loop runs (a file found unreadable by the background reading) reads like
    # the start's: one line, no source location
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    # A signal ends the loop through the normal path, so the checkpoint is saved and SQLite closes cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    guard_standard_streams()
    exit_as_promised(main, "every answer given so far is in the run's feedback.sqlite; continue "
                     "with --resume")


if __name__ == "__main__":
    cli()
