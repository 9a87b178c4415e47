"""The image pool: deterministic scan, class folders, bad files skipped with one warning."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from PIL import Image

from conftest import HYMENOPTERA, ROOT, make_subset
from dataset import AntBeeDataset, DatasetError


def test_scan_is_recursive_sorted_and_labels_follow_class_folders(tmp_path):
    root = make_subset(tmp_path / "p", HYMENOPTERA, 3)
    nested = tmp_path / "p" / "bees" / "more"
    nested.mkdir()
    src = sorted(os.listdir(os.path.join(HYMENOPTERA, "bees")))[10]
    os.symlink(os.path.join(HYMENOPTERA, "bees", src), nested / src)
    ds = AntBeeDataset(root, image_size=32)
    assert ds.class_names == ["ants", "bees"]
    assert len(ds) == 7
    assert ds.paths == sorted(ds.paths, key=lambda p: (os.path.dirname(p), p))
    assert ds.labels == [0, 0, 0, 1, 1, 1, 1]
    x, i = ds[0]
    assert x.shape == (3, 32, 32) and i == 0
    assert AntBeeDataset(root, image_size=32).hashes == ds.hashes


def test_classes_flag_names_classes_and_orders_keys(tmp_path):
    root = make_subset(tmp_path / "p", HYMENOPTERA, 2)
    ds = AntBeeDataset(root, image_size=32, classes=["bees", "ants"])
    assert ds.labels == [1, 1, 0, 0]


def test_gif_placeholder_is_not_an_image_type():
    ds = AntBeeDataset(HYMENOPTERA, image_size=16)
    assert len(ds) == 244
    assert not any(p.endswith(".gif") for p in ds.paths)


def test_text_saved_as_jpg_and_truncated_jpeg_are_skipped_with_one_warning(tmp_path):
    root = make_subset(tmp_path / "p", HYMENOPTERA, 3)
    (tmp_path / "p" / "ants" / "notes.jpg").write_text("this is not a picture")
    good = sorted(os.listdir(os.path.join(HYMENOPTERA, "bees")))[5]
    data = open(os.path.join(HYMENOPTERA, "bees", good), "rb").read()
    (tmp_path / "p" / "bees" / "cut.jpg").write_bytes(data[: len(data) // 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AntBeeDataset(root, image_size=32)
    assert len(ds) == 6
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "notes.jpg" in message and "cut.jpg" in message and "skipped 2" in message


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        AntBeeDataset(tmp_path / "nope")
    (tmp_path / "empty" / "ants").mkdir(parents=True)
    (tmp_path / "empty" / "bees").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class subfolders|holds no images"):
        AntBeeDataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="holds no images"):
        AntBeeDataset(tmp_path / "empty", classes=["ants", "bees"])


def draw(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_a_long_strip_costs_no_more_memory_than_a_photo(tmp_path):
    strip = draw(tmp_path / "strip.png", (200, 30, 60), size=(50000, 1))
    photo = draw(tmp_path / "photo.png", (200, 30, 60), size=(400, 300))
    assert strip.stat().st_size < 1000
    # Resizing the short side first made 64 x 3,200,000 pixels (600 MB) of this 50000x1 strip.
    code = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {ROOT!r})
        from dataset import load_image
        photo = load_image({str(photo)!r}, 64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        strip = load_image({str(strip)!r}, 64)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps([strip.tolist() == photo.tolist(), grown // 1024]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    same_as_photo, grown_mb = json.loads(proc.stdout)
    assert same_as_photo
    assert grown_mb < 50
