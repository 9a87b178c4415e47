"""The image pool of a run: a recursive, deterministic scan of a folder of any number of classes (named by
its subfolders), images decoded lazily, content hashes read in the background for a new folder.

    from dataset import ImagePool
    ds = ImagePool("data/hymenoptera_data/train", image_size=224)
    x, index = ds[0]          # normalised float tensor (3, H, W), position in the pool
    ds.labels[index]          # class from the folder name, or -1 when the folder names no class
"""
import errno
import hashlib
import io
import os
import stat
import sys
import threading
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from decoded_cache import EMPTY, FILLED, UNREADABLE, DecodedCache, decoded_cache_name
from hash_cache import HashCache
from user_errors import UserError, first_line

# torch is imported in the functions that make tensors: the labeling window lists and shows its first image
# before torch is loaded (2-5 s)

# torchvision's ImageFolder suffixes (torchvision.datasets.folder.IMG_EXTENSIONS) and GIF, read as its first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOT_AN_IMAGE = "not an image type"
ALREADY_SCANNED = "a link to a folder or file already scanned"
CANNOT_OPEN = "a folder that cannot be opened"
NOT_A_FILE = "not a regular file"
# The kernel's pseudo file systems: their files can block a read forever or never end (a link to / in a pool
# would otherwise walk them too).
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
JPEG_TAIL = 4096  # a whole JPEG ends with its end-of-image marker, at most a little padding after it
BACKGROUND_NICE = 10  # the background reading of a new folder yields the cores to the window and training
SCAN_PROGRESS_AFTER_S = 1.5  # a quicker reading of the files would only flash a line by
SCAN_PROGRESS_EVERY_S = 0.25


class DatasetError(UserError):
    """A folder the tool cannot use; the message names the folder and the fix."""


def hide_pillow_size_warning():
    """Silence Pillow's warning about a large image, which names no file and comes once per open of it:
    load_image says it once per decode, naming the file (Pillow still refuses one over twice its limit)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


hide_pillow_size_warning()


def is_image_file(path):
    """True when the file name has one of the accepted image suffixes."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def odd_names(folder):
    """(names of the links, names of the other entries that are neither folders nor regular files) of folder, from
    one directory read (no lstat per file, which on a large folder would cost more than the rest of a scan)."""
    try:
        with os.scandir(folder) as entries:
            kinds = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False))
                     for e in entries]
    except OSError:
        return set(), set()
    return {name for name, link, _ in kinds if link}, {name for name, link, plain in kinds if not link and not plain}


def is_system_path(real_path):
    """True for a path (links resolved) in one of the kernel's pseudo file systems (SYSTEM_FOLDERS)."""
    return any(real_path == top or real_path.startswith(top + os.sep) for top in SYSTEM_FOLDERS)


def open_regular(path):
    """The file at path opened for reading, or OSError when it is not a regular file: a pipe named like an image
    would block the open, and the read, forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, NOT_A_FILE, path)
    return os.fdopen(fd, "rb")


def _prefix(folder):
    # folder + separator, to join names onto without os.path.join's cost per file
    return folder if folder.endswith(os.sep) else folder + os.sep


def scan_image_folder(root):
    """Image files under root, each real file once, in a sorted order; and (path, why) for each entry left out.

    Links are followed, but a file or folder that can be reached without links is used where it lies."""
    # A tree without links is read once, a directory read per folder; one with links first needs to know
    # where everything lies.
    return _walk_plain(root) or _walk_images(root, _real_locations(root))


def _walk_plain(root):
    # The scan of a tree without links (None as soon as a link is met): what _walk_images finds there, in the
    # same order (folders depth-first, each one's files and subfolders sorted), without its second
    # directory read per folder for the link names, the largest cost left in a large folder's scan.
    found, skipped, stack = [], [], [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            skipped.append((folder, CANNOT_OPEN))
            continue
        dirs, files, special = [], [], set()
        for e in entries:
            if e.is_symlink():
                return None
            if e.is_dir(follow_symlinks=False):
                if not e.name.startswith("."):  # .thumbnails, .ipynb_checkpoints: copies, never a class
                    dirs.append(e.name)
                continue
            files.append(e.name)
            if not e.is_file(follow_symlinks=False):
                special.add(e.name)
        prefix = _prefix(folder)
        for name in sorted(files):
            if name.startswith("."):  # .DS_Store, editor and download leftovers say nothing
                continue
            if name in special:
                skipped.append((prefix + name, NOT_A_FILE))
            elif is_image_file(name):
                found.append(prefix + name)
            else:
                skipped.append((prefix + name, NOT_AN_IMAGE))
        stack.extend(os.path.join(folder, name) for name in sorted(dirs, reverse=True))
    return found, skipped


def _real_locations(root):
    # Where each folder and file lies when no link is followed (real folders, real files, the link names of
    # each folder): a link to one of them is skipped even when the walk meets the link first, so that an
    # image's class is the folder it lies in.
    real_dirs, real_files, links_in = set(), set(), {}
    # a file that is not a link lies where its folder really is: one realpath per folder, not per file, as
    # realpath makes a system call for each part of a path
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        real_folder = os.path.realpath(folder)
        real_dirs.add(real_folder)
        links_in[folder] = odd_names(folder)
        links = links_in[folder][0]
        prefix = _prefix(real_folder)
        real_files.update(prefix + f for f in files if f not in links)
    return real_dirs, real_files, links_in


def _walk_images(root, real):
    # The scan, following links, given where everything really lies (_real_locations).
    real_dirs, real_files, links_in = real
    found, skipped, outside = [], [], []
    real_root = os.path.realpath(root)
    inside = _prefix(real_root)
    seen_dirs, seen_files = {real_root}, set()
    through_link = {}
    unreadable = []
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable.append):
        linked = through_link.get(folder, False)
        real_folder = os.path.realpath(folder)
        links, special = links_in[folder] if folder in links_in else odd_names(folder)
        keep = []
        for name in sorted(d for d in dirs if not d.startswith(".")):  # as in _walk_plain
            sub = os.path.join(folder, name)
            real_sub, via = os.path.realpath(sub), linked or name in links
            if is_system_path(real_sub):
                skipped.append((sub, NOT_A_FILE))
                continue
            # a loop of links would otherwise list the same files again at every turn
            if real_sub in seen_dirs or (via and real_sub in real_dirs):
                skipped.append((sub, ALREADY_SCANNED))
                continue
            seen_dirs.add(real_sub)
            through_link[sub] = via
            keep.append(name)
        dirs[:] = keep
        prefix, real_prefix = _prefix(folder), _prefix(real_folder)
        # a linked folder that lies elsewhere brings files no one chose one by one (a link to / brings the disk)
        elsewhere = linked and not real_prefix.startswith(inside)
        for name in sorted(files):
            path = prefix + name
            if name.startswith("."):  # .DS_Store, editor and download leftovers say nothing
                continue
            is_link = name in links
            real_file = os.path.realpath(path) if is_link else real_prefix + name
            if name in special or (is_link and not _regular_or_missing(real_file)):
                skipped.append((path, NOT_A_FILE))
            elif not is_image_file(name):
                skipped.append((path, NOT_AN_IMAGE))
            elif real_file in seen_files or ((linked or is_link) and real_file in real_files):
                skipped.append((path, ALREADY_SCANNED))
            else:
                seen_files.add(real_file)
                found.append(path)
                # a link to one file elsewhere leaves the folder as surely as a link to a folder does
                # (a broken link is no image of the pool: the pool leaves it out when it finds the file gone)
                if elsewhere or (is_link and not real_file.startswith(inside) and os.path.exists(real_file)):
                    outside.append((path, "folders" if elsewhere else "files"))
    skipped.extend((err.filename, CANNOT_OPEN) for err in unreadable)
    if outside:
        warnings.warn(links_outside_line(root, outside), stacklevel=3)
    return found, skipped


def links_outside_line(root, outside):
    # The one line that says how many images came through links leading out of root, and through which kind:
    # ((path, "folders" or "files"), ...).
    kinds = " and ".join(k for k in ("folders", "files") if any(kind == k for _, kind in outside))
    return (f"{len(outside)} image file{'s' if len(outside) > 1 else ''} in {printable(root)} came through links to "
            f"{kinds} outside it (such as {printable(relative_path(outside[0][0], root))}): they are used as if they "
            "lay where the links are; remove the links that should not be followed")


def printable(name):
    """A file name as text any stream takes: a byte that is not UTF-8 written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _regular_or_missing(real_path):
    # What a link leads to: a regular file outside the system folders, or nothing (a broken link is named later,
    # when the pool finds its file gone).
    try:
        return not is_system_path(real_path) and stat.S_ISREG(os.stat(real_path).st_mode)
    except OSError:
        return True


def list_image_files(root):
    """Every image file under root, recursively, each real file once, in a sorted (platform-independent) order."""
    return scan_image_folder(root)[0]


def upright_rgb(img):
    """An opened image as 8-bit RGB, turned as its EXIF orientation says (a phone photo is stored sideways)."""
    if img.mode == "F" or img.mode.startswith("I"):
        img = eight_bit(img)
    rgb = img.convert("RGB")
    try:
        ImageOps.exif_transpose(rgb, in_place=True)  # the orientation tag travels in the converted image's info
    except Exception:  # a damaged EXIF block (Pillow raises SyntaxError, struct.error, ...) says nothing of the
        pass  # pixels: the picture is used as stored, never refused as unreadable
    return rgb


def eight_bit(img):
    """A 16-bit, 32-bit or float greyscale image scaled to mode L: Pillow's convert would clip it to white or
    black. Integers are read on the 16-bit scale, floats on 0..1, unless their values leave it."""
    a = np.asarray(img, dtype=np.float32)
    a = np.where(np.isfinite(a), a, 0)
    lo, hi = (0.0, 1.0) if img.mode == "F" else (0.0, 65535.0)
    if a.size and (a.min() < lo or a.max() > hi):
        lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    picture = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")
    picture.info = dict(img.info)  # the EXIF orientation with it
    return picture


def load_image(path, image_size):
    """Decode one image (a GIF's first frame) to a uint8 tensor (3, size, size): see decode_image."""
    import torch
    return torch.from_numpy(decode_image(path, image_size))


def decode_image(path, image_size):
    """Decode one image (a GIF's first frame) to a uint8 array (3, size, size), without torch: shorter side
    resized, then centre-cropped. Raises OSError/UnidentifiedImageError/ValueError for files that are not
    readable images."""
    with open_regular(path) as f, Image.open(f) as img:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, which is far cheaper than a full decode.
        img.draft("RGB", (image_size, image_size))
        if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
            warnings.warn(f"{path} is a very large image ({img.width}x{img.height} pixels, over Pillow's limit of "
                          f"{Image.MAX_IMAGE_PIXELS}): its decode is slow and needs much memory; shrink it unless "
                          "it is meant", stacklevel=3)
        img = upright_rgb(img)
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        # The centre square of the image resized to nw x nh, resampled straight from the source: a
        # 10000x1 strip would otherwise first be resized to 224x2,240,000 pixels (2.8 GB) and then cropped.
        box = (left * w / nw, top * h / nh, (left + image_size) * w / nw, (top + image_size) * h / nh)
        img = img.resize((image_size, image_size), Image.BILINEAR, box=box)
        data = np.frombuffer(img.tobytes(), dtype=np.uint8)
    return data.reshape(image_size, image_size, 3).transpose(2, 0, 1).copy()  # C order, writable


def header_problem(data):
    """Why the bytes of an image file cannot be an image, from a check far cheaper than decoding: the header,
    a PNG's chunk checksums, a JPEG's end marker; "" when they look fine."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 (the header is parsed on open; size proves it named one)
            kind = img.format
        if kind == "PNG":
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        if kind == "JPEG" and b"\xff\xd9" not in data[-JPEG_TAIL:]:
            return "truncated JPEG (no end-of-image marker)"
    except UnidentifiedImageError:  # its message names the in-memory buffer, which says nothing to a person
        return "not a picture in a format Pillow reads"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return first_line(err)
    return ""


def inspect_image_file(path):
    """(content hash, header_problem) of one file, read once."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as err:
        return None, err.strerror or type(err).__name__
    return hashlib.sha1(data).hexdigest(), header_problem(data)


def file_sha1(path):
    """Content hash of a file: answers follow the picture, not its name."""
    h = hashlib.sha1()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalize(batch_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, 3, H, W) or (3, H, W) to the float input the ResNet expects."""
    import torch
    x = batch_uint8.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def relative_path(path, root):
    """path relative to root; a plain cut for the paths the scan made by joining onto root (relpath normalises
    both paths at each call, which a large folder pays once per file)."""
    root = os.fspath(root)
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def class_folders(relative_paths):
    """Names of the subfolders that hold at least one of these images (paths relative to the pool's root),
    sorted."""
    return sorted({rel.split(os.sep)[0] for rel in relative_paths if os.sep in rel})


def skipped_summary(root, skipped, shown=5):
    """One line for everything left out of a pool, grouped by why, with a few names of each."""
    groups = {}
    for path, why in skipped:
        kind = why if why in (NOT_AN_IMAGE, ALREADY_SCANNED, CANNOT_OPEN, NOT_A_FILE) else "unreadable"
        name = os.path.relpath(path, root) + (f" ({why})" if kind == "unreadable" else "")
        groups.setdefault(kind, []).append(name)
    parts = []
    for kind, label in (("unreadable", "unreadable image file{s} (re-save them as JPEG or PNG, or remove them)"),
                        (CANNOT_OPEN, "folder{s} that cannot be opened (check their permissions)"),
                        (NOT_A_FILE, "entr{ies} neither regular files nor folders (pipes, devices, links into "
                                     + ", ".join(SYSTEM_FOLDERS) + ")"),
                        (NOT_AN_IMAGE, "file{s} not an image type (only " + " ".join(IMAGE_EXTENSIONS) + " are read)"),
                        (ALREADY_SCANNED, "link{s} to folders or files already scanned (each image is used once)")):
        names = groups.get(kind)
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            label = label.format(s="" if len(names) == 1 else "s", ies="y" if len(names) == 1 else "ies")
            parts.append(f"{len(names)} {label}: {', '.join(names[:shown])}{more}")
    return f"skipped {len(skipped)} in {root}: " + "; ".join(parts)


def scan_progress(what, total):
    """A count of the files read, on stderr, once a reading has taken SCAN_PROGRESS_AFTER_S, closed with the
    total; a quicker reading prints nothing."""
    return tqdm(total=total, desc=what, unit=" files", file=sys.stderr, delay=SCAN_PROGRESS_AFTER_S,
                mininterval=SCAN_PROGRESS_EVERY_S, leave=True)


class ImagePool:
    """The pool of images to learn from, read lazily: each image is decoded to the model's input size the
    first time it is used and kept in a decoded cache (a file of the run folder with cache_dir, else memory).

    `classes` names the classes (default: the subfolders); `labels[i]` is the class of the folder an
    image sits in, or -1 when it is not in a class folder. Content hashes come from the hash cache, else
    from reading each new file once: before the pool is returned, or with hash_in_background by a thread
    (start_reading; `hash_of` reads one at once when asked first). A file that fails the header check or
    the decode is in `unreadable` (warned once, never asked) and shows as a blank image.
    """

    def __init__(self, root, image_size=224, classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 cache_dir=None, cache_tag="pool", hash_in_background=False, scanned=None):
        if not os.path.isdir(root):
            raise DatasetError(f"image folder {root} does not exist: pass --images DIR with a folder of images")
        self.root = os.path.abspath(root)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        paths, relative = self._scan(root, classes, scanned)
        stats, identity = self._stat_files(paths, relative)
        name = decoded_cache_name(cache_tag, identity, image_size)
        self.decoded = DecodedCache(cache_dir and os.path.join(cache_dir, name), len(self.paths), image_size)
        self.unreadable = {i for i, s in enumerate(self.decoded.state) if s == UNREADABLE}
        self.hashes = [None] * len(self.paths)  # content hash per position: None until read (see hash_of)
        self.problem = {}    # position -> why its file is not an image (header check, or not readable)
        self.unwarned = []   # positions found not to be images after the pool was returned
        self.arrived = []    # positions hashed after the pool was returned, in that order (RLHFRun links them)
        self.hash_cache, self.hash_lock = HashCache(cache_dir), threading.Lock()
        self.to_read, self.stop_hashing, self.hasher = {}, threading.Event(), None  # position -> (size, mtime_ns)
        self._look_up_hashes(stats)
        if not hash_in_background:
            self.read_hashes(list(self.to_read), scan_progress(f"reading {root}", len(self.to_read)))
        else:
            self._read_until_an_image()
        self._report_left_out(root)

    # --- the start --------------------------------------------------------------------------------
    def _scan(self, root, classes, scanned=None):
        # The image files under root and their paths relative to it; sets the class names and what the scan
        # left out, and refuses a folder without two classes or without an image. scanned: (paths, skipped,
        # warning lines) of a scan of root made moments before (the labeling window's), its lines said again.
        if scanned is None:
            paths, self.skipped = scan_image_folder(root)
        else:
            paths, self.skipped, said = scanned
            for line in said:
                warnings.warn(line, stacklevel=4)
        relative = [relative_path(p, root) for p in paths]  # once: the class folders, then each image's class
        self.class_names = list(classes) if classes else class_folders(relative)
        if len(self.class_names) < 2:
            raise DatasetError(
                f"{root} has no class subfolders: put images in one subfolder per class "
                f"(e.g. {root}/ants, {root}/bees) or name the classes with --classes A B")
        if not paths:
            raise DatasetError(f"image folder {root} holds no images ({' '.join(IMAGE_EXTENSIONS)}): "
                               "pass --images DIR with a folder of images")
        return paths, relative

    def _stat_files(self, paths, relative):
        # The pool's positions: the scanned files still there, with their classes. Returns their stats and
        # the identity (path, size, mtime) that names the decoded cache; a file gone since the scan is skipped.
        self.paths, self.labels, stats, identity = [], [], [], []
        class_of = {name: k for k, name in enumerate(self.class_names)}
        for path, rel in zip(paths, relative):
            try:
                st = os.stat(path)
            except OSError as err:  # gone, or unreadable, since the scan
                self.skipped.append((path, err.strerror or type(err).__name__))
                continue
            if not stat.S_ISREG(st.st_mode):  # made a pipe or a device since the scan
                self.skipped.append((path, NOT_A_FILE))
                continue
            self.paths.append(path)
            stats.append(st)
            identity.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
            self.labels.append(class_of.get(rel.split(os.sep, 1)[0], -1))
        return stats, identity

    def _look_up_hashes(self, stats):
        # What the hash cache knows of each position; the rest waits in to_read.
        for i, (path, st) in enumerate(zip(self.paths, stats)):
            found = self.hash_cache.lookup(path, st)
            if found is None:
                # not the stat_result: a pool of a large folder keeps this for every file not read yet
                self.to_read[i] = (st.st_size, st.st_mtime_ns)
            else:
                self._known(i, *found)

    def _read_until_an_image(self):
        # A folder with no image in it is refused at the start: unless the hash cache knows an image here, read
        # until one is found (the first file, almost always); the rest is left to the background reading.
        if any(h is not None and i not in self.unreadable for i, h in enumerate(self.hashes)):
            return
        for i in list(self.to_read):
            self._read(i)
            if i not in self.unreadable:
                break

    def _report_left_out(self, root):
        # One warning for everything the start left out, one for the files an earlier run found undecodable;
        # a pool with no readable image is refused.
        self.skipped += [(self.paths[i], why) for i, why in self.problem.items()]
        self.arrived, self.unwarned = [], []  # what the start read is known and warned at once, below
        if self.skipped:
            warnings.warn(skipped_summary(root, self.skipped), stacklevel=3)
        if not self.to_read and len(self.unreadable) == len(self.paths):
            self.close()
            raise DatasetError(f"no readable image in {root}: every file failed to decode")
        earlier = sorted(i for i in self.unreadable if i not in self.problem)
        if earlier:  # found by an earlier run of this pool: still never asked, and said so again
            names = [relative_path(self.paths[i], root) for i in earlier]
            warnings.warn(f"{len(names)} image file{'s' if len(names) > 1 else ''} in {root} did not decode in "
                          f"an earlier run and {'are' if len(names) > 1 else 'is'} not asked: "
                          f"{', '.join(names[:5])}{' and more' if len(names) > 5 else ''} (re-save as JPEG or "
                          "PNG and --resume)", stacklevel=3)

    def start_reading(self):
        """Start the background reading of the files not hashed yet (hash_in_background; RLHFRun starts it
        with its first question, so it does not compete with the start-up the first question waits for)."""
        with self.hash_lock:
            if self.to_read and self.hasher is None and not self.stop_hashing.is_set():
                self.hasher = threading.Thread(target=self._hash_in_background, name="pool-hashes", daemon=True)
                self.hasher.start()

    # --- content hashes ---------------------------------------------------------------------------
    def _known(self, index, sha1, problem):
        # A position's hash and header verdict, however found.
        self.hashes[index] = sha1
        if sha1 is None or problem:
            self.problem[index] = problem
            self.unreadable.add(index)

    def _read(self, index):
        # Read one file not hashed yet (unless another thread just did) and remember what it holds.
        sha1, problem = inspect_image_file(self.paths[index])
        with self.hash_lock:
            identity = self.to_read.pop(index, None)
            if identity is None:
                return
            if sha1 is not None:  # a file that cannot be read now is tried again at the next start
                self.hash_cache.put(self.paths[index], *identity, sha1, problem)
            self._known(index, sha1, problem)
            self.arrived.append(index)
            if index in self.problem:
                self.unwarned.append(index)

    def read_hashes(self, indices, progress=None, polite=False):
        """Read the files of these positions that are not hashed yet (they stay unread when stop_hashing is
        set); their hashes go to the hash cache, committed every 1000 files so a killed scan keeps its work.
        progress: a scan_progress to count them on, closed at the end. polite: let other threads run after each."""
        for i in indices:
            if self.stop_hashing.is_set():
                break
            if i in self.to_read:
                self._read(i)
                if polite:  # the header check holds the GIL: the window's threads would wait for each file
                    time.sleep(0)
            if self.hash_cache.pending() >= 1000:
                self.hash_cache.commit()
            if progress is not None:
                progress.update()
        self.hash_cache.commit()
        if progress is not None:
            progress.close()

    def _hash_in_background(self):
        # Below the window and the training it waits for (a per-thread priority on Linux).
        if sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            except OSError:
                pass
        self.read_hashes(list(self.to_read), polite=True)
        self.warn_unreadable()

    def warn_unreadable(self):
        """One warning naming the files found not to be images since the pool was returned."""
        with self.hash_lock:
            found, self.unwarned = self.unwarned, []
        if found:
            warnings.warn(skipped_summary(self.root, [(self.paths[i], self.problem[i]) for i in found]),
                          stacklevel=2)

    def hash_of(self, index):
        """The content hash of a pool position, reading its file now when the background reading has not
        reached it yet (None when the file cannot be read)."""
        if index in self.to_read:
            self._read(index)
        return self.hashes[index]

    def all_hashes(self):
        """Every position's content hash (None where unreadable), reading now what is still unread (with the
        scan's progress line when that is slow)."""
        if self.to_read:
            self.read_hashes(list(self.to_read), scan_progress(f"reading {self.root}", len(self.to_read)))
        return self.hashes

    def close(self):
        """Stop the background reading (what it read stays in the hash cache) and close the cache files."""
        self.stop_hashing.set()
        if self.hasher is not None:
            self.hasher.join()
        self.warn_unreadable()
        self.hash_cache.close()
        self.decoded.close()

    def readable(self, index):
        """Decode the image when needed; False when its file no longer decodes (see `unreadable`)."""
        self.uint8([index])
        return index not in self.unreadable

    def uint8(self, indices):
        """The uint8 batch (N, 3, S, S) for pool positions, decoding (and caching) those not decoded yet."""
        import torch
        out = np.zeros((len(indices), 3, self.image_size, self.image_size), dtype=np.uint8)
        for row, index in enumerate(indices):
            index = int(index)
            if index in self.to_read:  # not read yet: the header check first, as for every other file
                self.hash_of(index)
            state = self.decoded.state[index]
            if state == FILLED:
                out[row] = self.decoded.read(index)
            elif state == EMPTY and index not in self.problem and (pixels := self._decode(index)) is not None:
                out[row] = pixels
            else:  # a blank picture: normalised, it is the mean image
                out[row] = np.round(np.array(self.mean) * 255).astype(np.uint8).reshape(3, 1, 1)
        return torch.from_numpy(out)

    def _decode(self, index):
        # The image's pixels, stored in the decoded cache; None (warned once) when the file does not decode.
        try:
            pixels = load_image(self.paths[index], self.image_size).numpy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            why = first_line(err)
            self.decoded.mark(index, UNREADABLE)
            if index not in self.unreadable:
                self.unreadable.add(index)
                warnings.warn(f"{self.paths[index]} cannot be decoded any more ({why}): it is shown as a blank "
                              "image and not asked; re-save it as JPEG or PNG and --resume", stacklevel=3)
            return None
        self.decoded.write(index, pixels)
        return pixels

    @property
    def num_classes(self):
        return len(self.class_names)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return normalize(self.uint8([index])[0], self.mean, self.std), index

    def batch(self, indices):
        """Normalised float batch (N, 3, H, W) for a list of pool positions (decoding what is missing)."""
        return normalize(self.uint8(list(indices)), self.mean, self.std)


AntBeeDataset = ImagePool  # the original script's name for the pool, kept for code written against it
