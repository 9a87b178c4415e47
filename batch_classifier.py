"""The batch engine of inference.py: a policy from any checkpoint, files decoded in DataLoader workers and
classified in batches, and the writers of the results (CSV, JSON, a table).

    clf = load_classifier("runs/demo")               # or the original script's rlhf_models.pth
    rows = classify_files(clf, list_inputs(["photos/"]))
"""
import functools
import json
import os
import sys
import tempfile
from collections import namedtuple

import torch

from checkpoint import FILE_NAME_BYTES, CheckpointError, atomic_write_bytes, is_stream, read_policy
from csv_cells import csv_text
from dataset import list_image_files, load_image, normalize
from user_errors import UserError, first_line


class InferenceError(UserError):
    """Bad input to inference.py: a model, image or output path it cannot use; the message names the fix."""


# A policy in eval mode with what reading images needs; step is None for the original script's files.
Classifier = namedtuple("Classifier", "net class_names image_size mean std name step")


def load_classifier(spec=None):
    """The policy of a checkpoint file, a run folder or a `latest` link (default runs/latest), ready to
    classify: eval mode, BatchNorm folded, channels-last. Also reads the original script's files."""
    policy = read_policy(spec)
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


def pick_precision(choice):
    """--precision auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32."""
    if choice != "auto":  # without those instructions bf16 is emulated, slower than fp32
        return choice
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "bf16" if any(flag in f.read() for flag in ("avx512_bf16", "amx_bf16")) else "fp32"
    except OSError:
        return "fp32"


def load_batch(paths, image_size):
    """Decode a batch of files (runs in a DataLoader worker): uint8 stack of the readable ones, error per file."""
    images, errors = [], []
    for path in paths:
        try:
            images.append(load_image(path, image_size))
            errors.append(None)
        except Exception as err:  # any decoder failure is that file's problem, never the whole job's
            errors.append(first_line(err))
    return (torch.stack(images) if images else None), errors


def classify_files(clf, files, batch_size=32, workers=2, precision="fp32", device="cpu", progress=None):
    """Classify files in batches; one row per file, in order: path, predicted, probabilities, error.
    progress: a tqdm advanced by each batch's files."""
    batches = -(-len(files) // batch_size)
    loader = torch.utils.data.DataLoader(files, batch_size, num_workers=min(workers, batches) if batches > 1 else 0,
                                         collate_fn=functools.partial(load_batch, image_size=clf.image_size))
    net, rows = clf.net.to(device), []
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
        for start, (images, errors) in zip(range(0, len(files), batch_size), loader):
            probs = []
            if images is not None:
                # Channels-last while still uint8 (a quarter of the bytes to move); normalize keeps the layout.
                x = normalize(images.contiguous(memory_format=torch.channels_last), clf.mean, clf.std).to(device)
                probs = torch.softmax(net(x).float(), dim=1).tolist()
            probs = iter(probs)
            for path, err in zip(files[start:start + batch_size], errors):
                p = None if err else dict(zip(clf.class_names, next(probs)))
                rows.append({"path": path, "error": err, "predicted": max(p, key=p.get) if p else None,
                             "probabilities": p})
            if progress is not None:
                progress.update(len(errors))
    return rows


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
