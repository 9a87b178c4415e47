"""The batch engine of inference.py: a policy from any checkpoint on torch or ONNX Runtime, files decoded in
worker processes and classified in batches, and the writers of the results (CSV, JSON, a table). torch is
imported only where the torch engine needs it: ONNX Runtime classifies a cached export without it.

    clf = load_classifier("runs/demo")               # or the original script's rlhf_models.pth
    clf, backend = load_served("runs/demo")          # ONNX Runtime on the CPU where it can, else torch
    rows = classify_files(clf, list_inputs(["photos/"]))
"""
import collections
import functools
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata

import numpy as np

import int8_engine
import onnx_engine
from checkpoint import (
    CHECKPOINT_NAME,
    FILE_NAME_BYTES,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    is_stream,
    read_policy,
)
from csv_cells import csv_text
from dataset import decode_image, list_image_files, normalize
from user_errors import UserError, first_line

BACKENDS = ("auto", "torch", "onnxruntime")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # without them a CPU emulates bf16, slower than fp32
PRECISION_FILE = "precision.json"  # in onnx_engine.cache_dir(): the measured --precision auto, per machine
PRECISION_BATCH, PRECISION_ROUNDS = 8, 3
NO_FP32_FILE = ("the int8 export is made from the fp32 export's file, and neither the checkpoint's folder nor the "
                "cache folder ($RLHF_CACHE_DIR) could take one")


class InferenceError(UserError):
    """Bad input to inference.py: a model, image or output path it cannot use; the message names the fix."""


# A policy with what reading images needs: net is a torch module in eval mode or an onnx_engine.OnnxNet; step is
# None for the original script's files.
Classifier = namedtuple("Classifier", "net class_names image_size mean std name step")


def load_classifier(spec=None):
    """The policy of a checkpoint file, a run folder or a `latest` link (default runs/latest), ready to
    classify: eval mode, BatchNorm folded, channels-last. Also reads the original script's files."""
    policy = read_policy(spec)
    import torch

    from models import PolicyModel, fold_batchnorm  # torchvision is slow to import: only for a usable file
    net = PolicyModel(len(policy.class_names))
    try:
        net.load_state_dict(policy.state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{spec or 'runs/latest'}: the policy weights do not fit a ResNet18 with "
                              f"{len(policy.class_names)} classes ({first_line(err)}): pass the checkpoint.pt "
                              "of a train_rlhf.py run") from None
    net = fold_batchnorm(net.eval()).to(memory_format=torch.channels_last)
    return Classifier(net, policy.class_names, policy.image_size, policy.mean, policy.std, policy.name, policy.step)


def checkpoint_file(spec=None):
    """The checkpoint file that read_policy would read for spec, or None where it would fail (it says why)."""
    path = spec or os.path.join("runs", "latest")
    if os.path.isdir(path) or os.path.basename(path) == "latest":
        if not os.path.lexists(path):
            return None
        from run_folder import resolve_run_dir
        try:
            path = os.path.join(resolve_run_dir(path), CHECKPOINT_NAME)
        except (OSError, ValueError):
            return None
    return path if os.path.isfile(path) else None


def load_served(spec=None, backend="auto", device="cpu"):
    """(Classifier, engine name) for inference.py's --backend: auto is ONNX Runtime on the CPU (torch, after one
    warning line, where it is missing or the export fails) and torch on CUDA."""
    if backend == "torch" or (backend == "auto" and device != "cpu"):
        return load_classifier(spec), "torch"
    if device != "cpu":
        raise InferenceError("--backend onnxruntime runs on the CPU: pass --device cpu, or --backend torch for CUDA")
    clf = None
    try:
        path = checkpoint_file(spec)
        found = onnx_engine.load_export(path) if path else None
        if found:
            return _from_export(*found, path), "onnxruntime"
        clf = load_classifier(spec)  # a bad checkpoint says so here, as on the torch path
        return export_served(clf, path), "onnxruntime"
    except onnx_engine.OnnxUnavailable as err:
        if backend == "onnxruntime":
            raise InferenceError(f"--backend onnxruntime: {err}; or pass --backend torch") from None
        print(f"warning: {err}; classifying with torch instead", file=sys.stderr)
        return clf or load_classifier(spec), "torch"


def export_served(clf, path):
    """The ONNX Runtime Classifier of torch Classifier `clf`, loaded from checkpoint `path`: exported and cached."""
    named_by = "folder" if clf.name == os.path.basename(os.path.dirname(os.path.abspath(path))) else "file"
    meta = {"class_names": clf.class_names, "image_size": clf.image_size, "mean": list(clf.mean),
            "std": list(clf.std), "step": clf.step, "named_by": named_by}
    return _from_export(*onnx_engine.export_policy(clf.net, meta, path), path)


def load_for_flags(spec=None, backend="auto", precision="auto", device="cpu", files=()):
    """(Classifier, engine name, precision) for inference.py's --model, --backend and --precision, for a job of
    `files`. ONNX Runtime runs fp32 or int8, torch fp32 or bf16: an explicit --precision bf16 has auto pick torch,
    int8 ONNX Runtime."""
    if precision == "bf16" and backend == "onnxruntime":
        raise InferenceError("--precision bf16 needs --backend torch (ONNX Runtime runs fp32 or int8): drop one "
                             "of them")
    if precision == "int8":
        if backend == "torch" or device != "cpu":
            raise InferenceError("--precision int8 runs on ONNX Runtime on the CPU: drop --backend torch and "
                                 "--device cuda, or pass --precision fp32")
        clf, engine = load_served(spec, "onnxruntime", device)
        return with_int8(clf, engine, "fp32", spec, files, forced=True)
    if backend == precision == "auto" and device == "cpu":
        # int8 is weighed against whichever of ONNX Runtime fp32 and torch won here, so the default is the fastest
        return cached_int8(spec, files) or with_int8(*pick_engine(spec), spec, files)
    clf, engine = load_served(spec, "torch" if precision == "bf16" else backend, device)
    if engine == "onnxruntime":
        return with_int8(clf, engine, "fp32", spec, files) if precision == "auto" else (clf, engine, "fp32")
    return clf, engine, pick_precision(precision, clf, device)


def cached_int8(spec, files):
    """(Classifier, "onnxruntime", "int8") where int8 measured faster here than the engine it was weighed against,
    and this checkpoint's int8 export is cached with a full check that passed; else None. Torch is not imported."""
    checkpoint = checkpoint_file(spec)
    known = _read_json(os.path.join(onnx_engine.cache_dir(), PRECISION_FILE))
    if (checkpoint is None or not int8_engine.job_long_enough(files)
            or not any(k.startswith("int8 | ") and _cached_choice_at(known, k) == "int8" for k in known)):
        return None
    found = int8_engine.load_int8(checkpoint, int8_reduce_range())
    if (not found or not int8_engine.fully_checked(found[1]) or not int8_engine.check_passed(found[1])
            or _cached_choice_at(known, int8_key(found[1]["image_size"])) != "int8"):
        return None
    return _from_export(*found, checkpoint), "onnxruntime", "int8"


def with_int8(clf, engine, precision, spec, files, forced=False):
    """(Classifier, engine, precision) for the job: int8 when forced, else where it measured faster on this machine
    than `engine` at `precision` (what the job runs otherwise) and its check against fp32 passed for this
    checkpoint (int8_engine), else what it was weighed against."""
    fallback = clf, engine, precision
    checkpoint = checkpoint_file(spec)
    enough = int8_engine.job_long_enough(files)
    path, key = os.path.join(onnx_engine.cache_dir(), PRECISION_FILE), int8_key(clf.image_size)
    known = _read_json(path)
    if not forced and (not enough or checkpoint is None or _cached_choice_at(known, key) not in (None, "int8")):
        return fallback
    reduce_range = int8_reduce_range()
    try:
        # one quantized for another kind of CPU (a run folder shared between machines) is not found: made again
        found = checkpoint and int8_engine.load_int8(checkpoint, reduce_range)
        if checkpoint and not found and engine == "torch" and not onnx_engine.load_export(checkpoint):
            export_served(clf, checkpoint)  # the fp32 export that int8 is quantized from
        short = found and not int8_engine.fully_checked(found[1])
        if checkpoint and (not found or (enough and short)):
            # none yet, or one an explicit int8 made on a short job: calibrated and checked on this job's images
            found = int8_engine.build_int8(checkpoint, *spread_sample(
                files, clf.image_size, int8_engine.CALIBRATION_IMAGES, int8_engine.CHECK_IMAGES),
                reduce_range=reduce_range)
    except onnx_engine.OnnxUnavailable:
        return fallback  # no ONNX Runtime, or none for this model: torch runs it, as measured or warned
    except Exception as err:  # the quantizer fails in many ways; any of them means running without int8
        found, failed = None, f"the int8 export failed ({type(err).__name__}: {first_line(err)})"
    else:
        failed = None
    if not found:
        if forced:
            raise InferenceError(f"--precision int8: {failed or NO_FP32_FILE}: pass --precision fp32")
        if failed:
            print(f"warning: {failed}; classifying in {precision}", file=sys.stderr)
        return fallback  # where no folder takes the fp32 export, auto runs it from memory without a word
    int8_clf = _from_export(*found, checkpoint)
    if forced:
        if not int8_engine.check_passed(found[1]):
            print(f"warning: {int8_engine.describe(found[1])}, where --precision auto asks "
                  f"{int8_engine.CHECK_TOLERANCE}: pass --precision fp32 for fp32's probabilities", file=sys.stderr)
        return int8_clf, "onnxruntime", "int8"
    if not int8_engine.check_passed(found[1]):
        return fallback
    choice = _cached_choice_at(known, key)
    if choice is None:
        seconds = {"int8": measure_onnx(int8_clf), precision: measure_onnx(clf) if engine == "onnxruntime"
                   else measure_precision(clf, kinds=(precision,))[precision]}
        choice = min(seconds, key=seconds.get)
        remember(path, known, key, choice, seconds)
    return (int8_clf, "onnxruntime", "int8") if choice == "int8" else fallback


def spread_sample(files, image_size, calibration, check):
    """(calibration images, check images): uint8 arrays (N, 3, H, W) of up to `calibration` and `check` files
    spread evenly over the job (a folder sorted by class must not calibrate on one class), decoded in this
    process, unreadable ones left out."""
    count = min(len(files), calibration + check)
    picked = [files[i * len(files) // count] for i in range(count)]
    first = picked[::3][:calibration]
    rest = [f for i, f in enumerate(picked) if i % 3 or i // 3 >= calibration]

    def decoded(part):
        batch = load_batch(part, image_size)[0] if part else None
        return np.zeros((0, 3, image_size, image_size), np.uint8) if batch is None else batch
    return decoded(first), decoded(rest)


def pick_engine(spec):
    """--backend auto --precision auto on the CPU: (Classifier, engine, precision) of whichever measured faster on
    this machine, ONNX Runtime fp32 or torch at its faster precision (measured once, kept in the cache folder).
    Where ONNX Runtime won and the checkpoint's export is cached, torch is never imported."""
    path = os.path.join(onnx_engine.cache_dir(), PRECISION_FILE)
    known, onnx_clf, checkpoint = _read_json(path), None, checkpoint_file(spec)
    try:
        found = onnx_engine.load_export(checkpoint) if checkpoint and _onnx_won_here(known) else None
        onnx_clf = found and _from_export(*found, checkpoint)
        if onnx_clf and _cached_choice(known, onnx_clf.image_size) == "onnxruntime":
            return onnx_clf, "onnxruntime", "fp32"
        torch_clf = load_classifier(spec)
        key = engine_key(torch_clf.image_size)
    except onnx_engine.OnnxUnavailable as err:
        print(f"warning: {err}; classifying with torch instead", file=sys.stderr)
        torch_clf = load_classifier(spec)
        return torch_clf, "torch", pick_precision("auto", torch_clf)
    choice = _cached_choice(known, torch_clf.image_size)
    if choice in ("fp32", "bf16"):
        return torch_clf, "torch", choice
    if onnx_clf is None:
        onnx_clf, engine = load_served(spec, "auto")  # a failed export warns and gives torch
        if engine == "torch":
            return torch_clf, "torch", pick_precision("auto", torch_clf)
    if choice == "onnxruntime":
        return onnx_clf, "onnxruntime", "fp32"
    seconds = {"onnxruntime": measure_onnx(onnx_clf), **measure_precision(torch_clf, kinds=(
        ("fp32", "bf16") if has_bf16() else ("fp32",)))}
    choice = min(seconds, key=seconds.get)
    remember(path, known, key, choice, seconds)
    return (onnx_clf, "onnxruntime", "fp32") if choice == "onnxruntime" else (torch_clf, "torch", choice)


def _onnx_won_here(known):
    """Whether ONNX Runtime measured faster on this machine at some image size: only then is the checkpoint's
    export looked for before torch (the look hashes the checkpoint and opens a session)."""
    head, tail = engine_key("\0").split("\0")
    return any(isinstance(v, dict) and v.get("choice") == "onnxruntime" and k.startswith(head) and k.endswith(tail)
               for k, v in known.items())


def _cached_choice(known, image_size):
    """The engine measured faster here for this image size ("onnxruntime", "fp32" or "bf16"), or None."""
    return _cached_choice_at(known, engine_key(image_size))


def _cached_choice_at(known, key):
    entry = known.get(key)
    return entry.get("choice") if isinstance(entry, dict) else None


def int8_key(image_size):
    """What an int8 measurement holds for: the engine measurement's key it was weighed beside."""
    return f"int8 | {engine_key(image_size)}"


def engine_key(image_size):
    """What an engine measurement holds for: a precision measurement's key, and ONNX Runtime's version."""
    return f"engine | {precision_key(image_size)} | onnxruntime {onnx_engine.runtime_version()}"


def measure_onnx(clf):
    """Seconds of clf's ONNX Runtime session on the precision measurement's batch: the best of a few rounds."""
    x = np.zeros((PRECISION_BATCH, 3, clf.image_size, clf.image_size), dtype=np.uint8)
    seconds = []
    for round_ in range(PRECISION_ROUNDS + 1):  # round 0 warms up
        t0 = time.perf_counter()
        clf.net.probabilities(x)
        if round_:
            seconds.append(time.perf_counter() - t0)
    return min(seconds)


def _from_export(net, meta, path):
    name = os.path.basename(os.path.dirname(os.path.abspath(path)) if meta["named_by"] == "folder" else path)
    return Classifier(net, meta["class_names"], meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]), name,
                      meta["step"])


def pick_precision(choice, clf=None, device="cpu"):
    """--precision auto: bf16 where it measured faster than fp32 on this machine (clf's model, measured once and
    kept in the cache folder), else fp32."""
    if choice != "auto":
        return choice
    if clf is None or (device == "cpu" and not has_bf16()):
        return "fp32"  # emulated bf16 is never the faster one
    path, key = os.path.join(onnx_engine.cache_dir(), PRECISION_FILE), precision_key(clf.image_size, device)
    known = _read_json(path)
    if isinstance(known.get(key), dict) and known[key].get("choice") in ("fp32", "bf16"):
        return known[key]["choice"]
    seconds = measure_precision(clf, device)
    choice = "bf16" if seconds["bf16"] < seconds["fp32"] else "fp32"
    remember(path, known, key, choice, seconds)
    return choice


def int8_reduce_range():
    """Whether int8 exports made here take 7-bit weights (a CPU without int8 dot products, int8_engine)."""
    return int8_engine.reduce_range_here(cpu_info()[1])


def has_bf16():
    """Whether this CPU runs bf16 natively (emulated bf16 is never the faster one)."""
    return any(f in cpu_info()[1] for f in BF16_FLAGS)


def remember(path, known, key, choice, seconds):
    """Keep a measured choice in the cache file (`known`: what it held); a cache that cannot be written is
    measured again next time: a slower start, never a wrong answer."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {**known, key: {"choice": choice, "seconds": seconds}})
    except OSError:
        pass


def _read_json(path):
    """A JSON object from a file; {} for a missing, unreadable or damaged one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def precision_key(image_size, device="cpu"):
    """What a precision measurement holds for: the processor, torch's version and the model's input size."""
    if device.startswith("cuda"):
        import torch
        where = torch.cuda.get_device_name()
    else:
        where = cpu_info()[0]
    return f"{where} | torch {torch_version()} | {image_size} px"


def torch_version():
    """The installed torch's version, read from its package metadata: a cached choice is looked up without
    importing torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def measure_precision(clf, device="cpu", kinds=("fp32", "bf16")):
    """Seconds of a forward pass of clf's network on a small batch, fp32 and bf16: the best of a few rounds."""
    import torch
    net = clf.net.to(device)
    x = torch.zeros(PRECISION_BATCH, 3, clf.image_size, clf.image_size).to(device, memory_format=torch.channels_last)
    times = {kind: [] for kind in kinds}
    with torch.inference_mode():
        for round_ in range(PRECISION_ROUNDS + 1):  # round 0 warms up (oneDNN builds its kernels on first use)
            for precision, seconds in times.items():
                with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=precision == "bf16"):
                    t0 = time.perf_counter()
                    net(x).float().cpu()  # the copy waits for a GPU to finish
                    if round_:
                        seconds.append(time.perf_counter() - t0)
    return {precision: min(seconds) for precision, seconds in times.items()}


def cpu_info():
    """(model name, set of flags) of the first processor in /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("model name") or platform.processor() or platform.machine(), set(fields.get("flags", "").split())


def load_batch(paths, image_size):
    """Decode a batch of files (in a worker process): uint8 array (N, 3, H, W) of the readable ones, or None, and
    an error per file."""
    images, errors = [], []
    for path in paths:
        try:
            images.append(decode_image(path, image_size))
            errors.append(None)
        except Exception as err:  # any decoder failure is that file's problem, never the whole job's
            errors.append(first_line(err))
    return (np.stack(images) if images else None), errors


def decoded_batches(files, batch_size, image_size, workers):
    """load_batch over the files in batches, in order; in `workers` processes (0: this one) that stay at most two
    batches each ahead of the caller, so a large folder is never decoded into memory all at once."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    decode = functools.partial(load_batch, image_size=image_size)
    workers = min(workers, len(chunks)) if len(chunks) > 1 else 0
    if not workers:
        yield from map(decode, chunks)
        return
    pool = ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        todo, pending = iter(chunks), collections.deque()
        for chunk in todo:
            pending.append(pool.submit(decode, chunk))
            if len(pending) == 2 * workers:
                break
        while pending:
            batch = pending.popleft().result()
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.submit(decode, chunk))
            yield batch
    finally:  # Ctrl-C reaches this process alone (the workers ignore it): stop the queued work and go
        pool.shutdown(wait=True, cancel_futures=True)


def classify_files(clf, files, batch_size=32, workers=2, precision="fp32", device="cpu", progress=None):
    """Classify files in batches; one row per file, in order: path, predicted, probabilities, error.
    progress: a tqdm advanced by each batch's files."""
    forward, rows = _engine(clf, device, precision), []
    batches = decoded_batches(files, batch_size, clf.image_size, workers)
    for start, (images, errors) in zip(range(0, len(files), batch_size), batches):
        probs = iter(forward(images) if images is not None else [])
        for path, err in zip(files[start:start + batch_size], errors):
            p = None if err else dict(zip(clf.class_names, next(probs)))
            rows.append({"path": path, "error": err, "predicted": max(p, key=p.get) if p else None,
                         "probabilities": p})
        if progress is not None:
            progress.update(len(errors))
    return rows


def _engine(clf, device, precision="fp32"):
    """uint8 image batch (a numpy array) -> probability lists, on the classifier's engine (ONNX Runtime or
    torch at the given precision)."""
    if isinstance(clf.net, onnx_engine.OnnxNet):
        return lambda images: clf.net.probabilities(images).tolist()
    import torch
    net = clf.net.to(device)

    def forward(images):
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
            # Channels-last while still uint8 (a quarter of the bytes to move); normalize keeps the layout.
            x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
            x = normalize(x, clf.mean, clf.std).to(device)
            return torch.softmax(net(x).float(), dim=1).tolist()
    return forward


def list_inputs(paths):
    """Files to classify: files as given, folders searched recursively; each file once, first-seen order."""
    files, seen = [], set()
    for p in paths:
        if not os.path.exists(p):
            raise InferenceError(f"{p} does not exist: pass an image file or a folder of images")
        for f in (list_image_files(p) if os.path.isdir(p) else [p]):
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    return files


def check_writable(path, flag):
    """Fail before the work, not after it, when the output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a folder")
        if is_stream(path):  # a device or pipe is written into, not replaced: its folder need not be writable
            if not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied")
            return
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InferenceError(f"cannot write {flag} {path} ({err.strerror}): "
                             "pass a file path in an existing, writable folder") from None


def write_csv(rows, path):
    """Classified rows as CSV (path, predicted, prob_<class>...), cells neutralised for spreadsheets, written
    atomically."""
    done = [r for r in rows if r["error"] is None]
    names = list(done[0]["probabilities"]) if done else []
    text = csv_text(["path", "predicted"] + [f"prob_{c}" for c in names],
                    [[r["path"], r["predicted"]] + [f"{r['probabilities'][c]:.6f}" for c in names] for r in done])
    atomic_write_bytes(path, text.encode("utf-8", FILE_NAME_BYTES))


def write_json(rows, path):
    """Classified rows as a JSON list of {path, predicted, probabilities}, written atomically."""
    done = [{k: r[k] for k in ("path", "predicted", "probabilities")} for r in rows if r["error"] is None]
    atomic_write_bytes(path, (json.dumps(done, indent=1, ensure_ascii=False) + "\n").encode("utf-8", FILE_NAME_BYTES))


def print_table(rows, names, out=sys.stdout):
    """Classified rows as aligned columns: path, predicted class, probability of each class."""
    width = max(len(r["path"]) for r in rows)
    print(f"{'path':<{width}}  {'predicted':<12}" + "".join(f"{c[:8]:>9}" for c in names), file=out)
    for r in rows:
        probs = "".join(f"{r['probabilities'][c]:9.3f}" for c in names)
        print(f"{r['path']:<{width}}  {r['predicted']:<12}{probs}", file=out)


def shard_files(files, batch_size, ranks):
    """This process's share of the files: a contiguous run of whole batches, so every batch holds the same
    images as in one process and the predictions are bit-for-bit the same."""
    batches = -(-len(files) // batch_size)
    first, last = ranks.block(batches)
    return files[first * batch_size:last * batch_size]
