"""The image pool: deterministic scan, class folders, bad files skipped with one warning."""
import os
import warnings

import pytest

from conftest import make_subset
from dataset import AntBeeDataset, DatasetError


def test_scan_is_recursive_sorted_and_labels_follow_class_folders(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 3)
    nested = tmp_path / "p" / "bees" / "more"
    nested.mkdir()
    src = sorted(os.listdir(os.path.join(photos, "bees")))[10]
    os.symlink(os.path.join(photos, "bees", src), nested / src)
    ds = AntBeeDataset(root, image_size=32)
    assert ds.class_names == ["ants", "bees"]
    assert len(ds) == 7
    assert ds.paths == sorted(ds.paths, key=lambda p: (os.path.dirname(p), p))
    assert ds.labels == [0, 0, 0, 1, 1, 1, 1]
    x, i = ds[0]
    assert x.shape == (3, 32, 32) and i == 0
    assert AntBeeDataset(root, image_size=32).hashes == ds.hashes


def test_classes_flag_names_classes_and_orders_keys(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 2)
    ds = AntBeeDataset(root, image_size=32, classes=["bees", "ants"])
    assert ds.labels == [1, 1, 0, 0]


def test_gif_placeholder_is_not_an_image_type(photos):
    assert os.path.isfile(os.path.join(photos, "ants", "placeholder.gif"))
    ds = AntBeeDataset(photos, image_size=16)
    assert len(ds) == 100
    assert not any(p.endswith(".gif") for p in ds.paths)
    assert any(p.endswith(".png") for p in ds.paths) and any(p.endswith(".jpg") for p in ds.paths)


def test_the_shared_photo_set_scans_to_its_244_photos(shared_data):
    # PyTorch's archive as downloaded: its "image not found" GIF is left out, its one .jpeg kept.
    ds = AntBeeDataset(os.path.join(shared_data, "hymenoptera_data", "train"), image_size=16)
    assert len(ds) == 244 and ds.class_names == ["ants", "bees"]
    assert not any(p.endswith(".gif") for p in ds.paths) and any(p.endswith(".jpeg") for p in ds.paths)


def test_text_saved_as_jpg_and_truncated_jpeg_are_skipped_with_one_warning(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 3)
    (tmp_path / "p" / "ants" / "notes.jpg").write_text("this is not a picture")
    good = [f for f in sorted(os.listdir(os.path.join(photos, "bees"))) if f.endswith(".jpg")][5]
    data = open(os.path.join(photos, "bees", good), "rb").read()
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
