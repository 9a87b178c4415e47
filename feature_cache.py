"""The frozen layers' output for every image, computed once: the fast path of --finetune layer4/head.

With frozen layers, what the trainable layers see of an image never changes during a run, so PPO and
reward-model updates, and the scoring of the unanswered pool, run on cached tensors in milliseconds.
Entries are keyed by the image's content hash; the whole cache by a digest of the frozen weights, the
image size and the finetune mode, so a changed file or changed weights are recomputed, never reused.
"""
import hashlib
import os

import torch

from checkpoint import load_checkpoint, save_checkpoint


def weights_digest(module):
    """SHA-1 over a module's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Cached inputs of the trainable layers for the images of a pool, saved in the run folder."""

    def __init__(self, folder, encode, key, batch_size=32):
        self.encode = encode
        self.key = key
        self.batch_size = batch_size
        self.path = os.path.join(folder, f"features-{key[:16]}.pt")
        self.features = {}
        if os.path.isfile(self.path):
            saved = load_checkpoint(self.path)
            if saved.get("key") == key:
                self.features = saved["features"]
        self.dirty = False

    def has(self, ds, index):
        """True when the features of pool position index are cached."""
        return ds.hashes[index] is not None and ds.hashes[index] in self.features  # reads no file

    def fill(self, ds, indices=None):
        """Compute (batched) the features of every image of ds not cached yet; returns how many were new."""
        # each image not cached is decoded next, which reads its file anyway: its hash costs nothing more
        todo = [i for i in (range(len(ds)) if indices is None else indices) if ds.hash_of(i) not in self.features]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            out = self.encode(ds.batch(chunk)).to(torch.float16)
            for i, f in zip(chunk, out):
                self.features[ds.hash_of(i)] = f.clone()
        self.dirty = self.dirty or bool(todo)
        return len(todo)

    def batch(self, ds, indices):
        """Float32 features for pool positions (computed on demand when missing)."""
        self.fill(ds, indices)
        if not len(indices):
            shape = next(iter(self.features.values())).shape if self.features else (0,)
            return torch.empty((0, *shape))
        return torch.stack([self.features[ds.hash_of(i)] for i in indices]).float()

    def save(self):
        """Write the cache atomically when it gained entries; remove caches of other weights."""
        if not self.dirty:
            return
        folder = os.path.dirname(self.path)
        for name in os.listdir(folder):
            if name.startswith("features-") and name.endswith(".pt") and os.path.join(folder, name) != self.path:
                os.unlink(os.path.join(folder, name))
        save_checkpoint(self.path, {"key": self.key, "features": self.features})
        self.dirty = False
