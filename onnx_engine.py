"""The ONNX Runtime engine of inference.py: the served policy exported to ONNX once per checkpoint (cached beside
it, else under the per-machine cache), and batches of decoded images classified by an ONNX Runtime session in fp32.

    net = load_export("runs/demo/checkpoint.pt")            # None until export_policy() has made it
    probs = net.probabilities(uint8_batch)                  # (N, 3, H, W) uint8 -> (N, K) float32

Torch is imported only to make an export, never to load or run one.
"""
import hashlib
import inspect
import json
import os
import re
import tempfile
import warnings

import numpy as np

from user_errors import first_line

# Part of every export's digest: bump it when what is exported changes, so that no older export is reused.
EXPORT_VERSION = 1
OPSET = 17
META_KEY = "rlhf_imgcls"  # the export's metadata: what reading images and naming classes needs
CACHE_ENV = "RLHF_CACHE_DIR"
INSTALL_HINT = "pip install onnxruntime onnx (requirements.txt)"


class OnnxUnavailable(Exception):
    """ONNX Runtime is missing or the export failed; the message says why in one line."""


def cache_dir():
    """The per-machine cache folder: $RLHF_CACHE_DIR, else ~/.cache/rlhf-imgcls."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rlhf-imgcls")


def normalize(images, mean, std):
    """numpy twin of dataset.normalize, the same float32 operations in the same order: uint8 (N, 3, H, W) to the
    float input the ResNet expects."""
    x = np.asarray(images).astype(np.float32) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - m) / s


class OnnxNet:
    """A session on an exported policy (softmax included) and how its input is normalised."""

    def __init__(self, session, mean, std):
        self.session, self.mean, self.std = session, mean, std
        self.input = session.get_inputs()[0].name

    def probabilities(self, images):
        """uint8 images (N, 3, H, W), a numpy array or a CPU tensor, to class probabilities (N, K)."""
        return self.session.run(None, {self.input: normalize(images, self.mean, self.std)})[0]


def _runtime():
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxUnavailable(f"ONNX Runtime is not installed ({err.name or err}): {INSTALL_HINT}") from None
    return onnxruntime


def runtime_version():
    """ONNX Runtime's version (what an engine measurement holds for)."""
    return _runtime().__version__


def checkpoint_digest(path):
    """Digest of the checkpoint's bytes and the export version: a changed checkpoint never reuses an old export."""
    h = hashlib.sha256(f"rlhf-imgcls onnx export {EXPORT_VERSION}\n".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def export_places(checkpoint, digest):
    """Where the export of this checkpoint may lie, in the order they are tried: beside it, then the cache."""
    return [os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{os.path.basename(checkpoint)}.{digest}.onnx"),
            os.path.join(cache_dir(), "onnx", f"{digest}.onnx")]


def _session(model):
    """An ONNX Runtime session on a file or bytes, and the export's metadata."""
    ort = _runtime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its notes about unused providers are not the user's business
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # torchrun and the test suite give each process its share
        opts.intra_op_num_threads = int(threads)
    # The DataLoader workers decode on the same cores: threads that spin between batches would slow them.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])
    return session, meta


def load_export(checkpoint):
    """(OnnxNet, metadata) of the checkpoint's cached export, or None when there is none (or none readable)."""
    _runtime()  # a missing runtime is said as such, not taken for a missing export
    try:
        digest = checkpoint_digest(checkpoint)
    except OSError:
        return None  # reading the checkpoint to export it says what is wrong with the file
    for place in export_places(checkpoint, digest):
        if os.path.isfile(place):
            try:
                session, meta = _session(place)
                return OnnxNet(session, meta["mean"], meta["std"]), meta
            except Exception:  # a damaged or foreign file: made again below, over it
                continue
    return None


def export_policy(net, meta, checkpoint=None):
    """Export the eval-mode policy `net` (softmax appended), cache it for checkpoint (None: keep it in memory only)
    and return (OnnxNet, metadata). meta holds image_size, mean, std and whatever else the reader needs."""
    ort_bytes = _export_bytes(net, meta)
    try:
        session, meta = _session(ort_bytes)
    except OnnxUnavailable:
        raise
    except Exception as err:  # an operator this ONNX Runtime lacks, say: torch still runs the model
        raise OnnxUnavailable(f"ONNX Runtime cannot run the export ({type(err).__name__}: {first_line(err)})") from None
    if checkpoint is None:
        return OnnxNet(session, meta["mean"], meta["std"]), meta
    places = export_places(checkpoint, checkpoint_digest(checkpoint))
    for place in places:
        if _save(place, ort_bytes):
            break  # a folder that cannot be written is no error: the next place, or memory only
    _remove_older_exports(places[0])
    return OnnxNet(session, meta["mean"], meta["std"]), meta


def _export_bytes(net, meta):
    try:
        import onnx
        import torch
        size = meta["image_size"]
        model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
        with tempfile.TemporaryDirectory(prefix="rlhf-onnx-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own deprecation
            path = os.path.join(tmp, "policy.onnx")
            # The TorchScript exporter: it needs the onnx package alone, where the dynamo one needs onnxscript too
            # (torch before 2.5 has no choice to make).
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, opset_version=OPSET,
                              input_names=["images"], output_names=["probabilities"],
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, **legacy)
            proto = onnx.load(path)
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        return proto.SerializeToString()
    except ImportError as err:
        raise OnnxUnavailable(f"the ONNX export needs {err.name or err}: {INSTALL_HINT}") from None
    except Exception as err:  # the exporter fails in many ways; any of them means: use torch
        raise OnnxUnavailable(f"the ONNX export failed ({type(err).__name__}: {first_line(err)})") from None


def _save(place, data):
    from checkpoint import atomic_write_bytes  # imports torch, which making an export has already paid for
    try:
        os.makedirs(os.path.dirname(place), exist_ok=True)
        atomic_write_bytes(place, data)
        return True
    except OSError:
        return False


def _remove_older_exports(place, suffix=".onnx"):
    """Exports of earlier contents of the same checkpoint file (`place` and those older ones named
    CHECKPOINT.DIGEST + suffix): never read again, and each the model's size."""
    folder, name = os.path.split(place)
    older = re.compile(re.escape(name[:-len(".0123456789abcdef" + suffix)]) + r"\.[0-9a-f]{16}" + re.escape(suffix))
    try:
        for other in os.listdir(folder):
            if other != name and older.fullmatch(other):
                os.unlink(os.path.join(folder, other))
    except OSError:
        pass  # a folder we may not change: the old files only take room
