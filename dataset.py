"""Image pool for RLHF: a recursive, deterministic scan of a folder, with class names from subfolders.

    from dataset import AntBeeDataset
    ds = AntBeeDataset("data/hymenoptera_data/train", image_size=224)
    x, index = ds[0]          # normalised float tensor (3, H, W), position in the pool
    ds.labels[index]          # class from the folder name, or -1 when the folder names no class
"""
import hashlib
import os
import warnings

import torch
from PIL import Image, UnidentifiedImageError

# The suffixes torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(Exception):
    """A folder the tool cannot use; the message names the folder and the fix."""


def is_image_file(path):
    """True when the file name has one of the accepted image suffixes."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(root):
    """Every image file under root, recursively, in a sorted (platform-independent) order."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files) if is_image_file(f))
    return found


def load_image(path, image_size):
    """Decode one image to a uint8 tensor (3, size, size): shorter side resized, then centre-cropped.

    Raises OSError/UnidentifiedImageError/ValueError for files that are not readable images.
    """
    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly, which is far cheaper than a full decode.
        img.draft("RGB", (image_size, image_size))
        img = img.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        # The centre square of the image resized to nw x nh, resampled straight from the source: a
        # 10000x1 strip would otherwise first be resized to 224x2,240,000 pixels (2.8 GB) and then cropped.
        box = (left * w / nw, top * h / nh, (left + image_size) * w / nw, (top + image_size) * h / nh)
        img = img.resize((image_size, image_size), Image.BILINEAR, box=box)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(image_size, image_size, 3).permute(2, 0, 1).contiguous()


def file_sha1(path):
    """Content hash of a file: answers follow the picture, not its name."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalize(batch_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, 3, H, W) or (3, H, W) to the float input the ResNet expects."""
    x = batch_uint8.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def class_folders(root):
    """Names of the subfolders of root that hold at least one image (recursively), sorted."""
    names = []
    for entry in sorted(os.listdir(root)):
        sub = os.path.join(root, entry)
        if os.path.isdir(sub) and list_image_files(sub):
            names.append(entry)
    return names


class AntBeeDataset(torch.utils.data.Dataset):
    """The pool of images to learn from, decoded once and kept in memory at the model's input size.

    `classes` names the classes (default: the subfolders); `labels[i]` is the class of the folder an
    image sits in, or -1 when it is not in a class folder. Unreadable files are skipped with one warning.
    """

    def __init__(self, root, image_size=224, classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not os.path.isdir(root):
            raise DatasetError(f"image folder {root} does not exist: pass --images DIR with a folder of images")
        self.root = os.path.abspath(root)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        folders = class_folders(root)
        self.class_names = list(classes) if classes else folders
        if len(self.class_names) < 2:
            raise DatasetError(
                f"{root} has no class subfolders: put images in one subfolder per class "
                f"(e.g. {root}/ants, {root}/bees) or name the classes with --classes A B")
        paths = list_image_files(root)
        if not paths:
            raise DatasetError(f"image folder {root} holds no images ({' '.join(IMAGE_EXTENSIONS)}): "
                               "pass --images DIR with a folder of images")
        self.paths, self.labels, self.hashes, self.skipped = [], [], [], []
        images = []
        for path in paths:
            try:
                images.append(load_image(path, image_size))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
                self.skipped.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
                continue
            self.paths.append(path)
            self.hashes.append(file_sha1(path))
            top = os.path.relpath(path, root).split(os.sep)[0]
            self.labels.append(self.class_names.index(top) if top in self.class_names else -1)
        if self.skipped:
            listing = "; ".join(f"{p} ({why})" for p, why in self.skipped)
            warnings.warn(f"skipped {len(self.skipped)} unreadable image file(s): {listing}", stacklevel=2)
        if not images:
            raise DatasetError(f"no readable image in {root}: every file failed to decode")
        self.images = torch.stack(images)

    @property
    def num_classes(self):
        return len(self.class_names)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return normalize(self.images[index], self.mean, self.std), index

    def batch(self, indices):
        """Normalised float batch (N, 3, H, W) for a list of pool positions."""
        return normalize(self.images[torch.as_tensor(indices, dtype=torch.long)], self.mean, self.std)
