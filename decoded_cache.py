"""Decoded model inputs of a pool, one uint8 (3, S, S) slot per image in one file of the run folder.

Slots are filled the first time an image is used, so the first question needs one decode, memory holds only
what is being used (reads and writes go through pread/pwrite, not a mapping that would stay resident), and a
resume decodes nothing already decoded. The file starts with one state byte per slot (EMPTY, FILLED or
UNREADABLE), then the slots. Its name holds a digest of the pool's files (relative path, size and mtime_ns, the
identity the hash cache trusts) and the image size, so a changed folder or size starts a new file and never
reads another pool's pixels, and the file opens before the pool's files have been read for their hashes.
"""
import hashlib
import os
import tempfile
import threading
import warnings

import numpy as np

EMPTY, FILLED, UNREADABLE = 0, 1, 2
HEADER_ALIGN = 4096  # slots start on a page boundary


def decoded_cache_name(tag, identities, image_size):
    """File name for a pool: tag (pool or val), the image size and a digest of its files' identities, in
    pool order (one string per file: relative path, size, mtime_ns)."""
    # surrogateescape: a file name that is not UTF-8 keeps its bytes (os.fsencode's way)
    digest = hashlib.sha1("\n".join(identities).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"decoded-{tag}-{image_size}px-{digest}.u8"


class DecodedCache:
    """n slots of uint8 (3, size, size) in the file at path, or in memory when path is None."""

    def __init__(self, path, n, image_size):
        self.path, self.n, self.size = path, n, image_size
        self.slot_bytes = 3 * image_size * image_size
        self.data_start = -(-n // HEADER_ALIGN) * HEADER_ALIGN
        self.lock = threading.Lock()  # the window's two worker threads read and fill it at once
        self.fd, self.memory, self.write_failed = None, {}, False
        if path is None:
            self.state = bytearray(n)
            return
        total = self.data_start + n * self.slot_bytes
        if not (os.path.isfile(path) and os.path.getsize(path) == total):
            create_sparse_file(path, total)
        self.fd = os.open(path, os.O_RDWR)
        self.state = bytearray(os.pread(self.fd, n, 0))

    def filled(self):
        """How many slots hold a decoded image."""
        return self.state.count(FILLED)

    def read(self, index):
        """The uint8 array (3, size, size) of a FILLED slot."""
        if self.fd is None:
            return self.memory[index]
        raw = os.pread(self.fd, self.slot_bytes, self.data_start + index * self.slot_bytes)
        return np.frombuffer(raw, dtype=np.uint8).reshape(3, self.size, self.size)

    def write(self, index, pixels):
        """Store a decoded image (uint8 array (3, size, size)); the state byte is written after the pixels,
        so a process killed in between leaves the slot EMPTY, never FILLED with half an image."""
        if self.fd is None:
            self.memory[index] = pixels
        elif not self._written(pixels.tobytes(), self.data_start + index * self.slot_bytes):
            return
        self.mark(index, FILLED)

    def mark(self, index, state):
        """Record a slot's state (FILLED or UNREADABLE)."""
        with self.lock:
            if self.fd is None or self._written(bytes([state]), index):
                self.state[index] = state

    def _written(self, data, offset):
        # A full disk must not stop a labeling session: the image is then decoded again at each use.
        try:
            os.pwrite(self.fd, data, offset)
            return True
        except OSError as err:
            if not self.write_failed:
                self.write_failed = True
                warnings.warn(f"cannot write the decoded images to {self.path} ({err.strerror or err}): images "
                              "not cached yet are decoded again at each use; free space on its disk", stacklevel=4)
            return False

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def create_sparse_file(path, total):
    """A zero-filled (sparse: no disk used until written) file of total bytes, made beside path and moved
    into place, with older decoded caches of the same tag removed."""
    folder, name = os.path.split(path)
    prefix = name.rsplit("-", 2)[0] + "-"  # decoded-<tag>-
    for old in os.listdir(folder):
        if old.startswith(prefix) and old.endswith(".u8") and old != name:
            os.unlink(os.path.join(folder, old))
    # named like checkpoint.py's temporary files, so a --resume after a killed start removes a stray one
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.truncate(total)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a run's files should read like any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
