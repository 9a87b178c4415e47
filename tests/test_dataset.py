"""The image pool: deterministic scan, class folders, bad files skipped with one warning."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, copied_subset, make_subset
from dataset import DatasetError, ImagePool, scan_image_folder


def test_scan_is_recursive_sorted_and_labels_follow_class_folders(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 3)
    nested = tmp_path / "p" / "bees" / "more"
    nested.mkdir()
    src = sorted(os.listdir(os.path.join(photos, "bees")))[10]
    os.symlink(os.path.join(photos, "bees", src), nested / src)
    ds = ImagePool(root, image_size=32)
    assert ds.class_names == ["ants", "bees"]
    assert len(ds) == 7
    assert ds.paths == sorted(ds.paths, key=lambda p: (os.path.dirname(p), p))
    assert ds.labels == [0, 0, 0, 1, 1, 1, 1]
    x, i = ds[0]
    assert x.shape == (3, 32, 32) and i == 0
    assert ImagePool(root, image_size=32).hashes == ds.hashes


def test_classes_flag_names_classes_and_orders_keys(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 2)
    ds = ImagePool(root, image_size=32, classes=["bees", "ants"])
    assert ds.labels == [1, 1, 0, 0]


def test_a_gif_is_read_as_its_first_frame(photos):
    assert os.path.isfile(os.path.join(photos, "ants", "placeholder.gif"))
    ds = ImagePool(photos, image_size=16)
    assert len(ds) == 101
    assert any(p.endswith(".gif") for p in ds.paths)
    assert any(p.endswith(".png") for p in ds.paths) and any(p.endswith(".jpg") for p in ds.paths)


def test_the_shared_photo_set_scans_to_its_244_photos_and_its_gif(shared_data):
    # PyTorch's archive as downloaded: its "image not found" GIF is read like any GIF, its one .jpeg kept.
    ds = ImagePool(os.path.join(shared_data, "hymenoptera_data", "train"), image_size=16)
    assert len(ds) == 245 and ds.class_names == ["ants", "bees"]
    assert any(p.endswith(".gif") for p in ds.paths) and any(p.endswith(".jpeg") for p in ds.paths)


def test_text_saved_as_jpg_and_truncated_jpeg_are_never_asked_and_warned_once(tmp_path, photos):
    root = copied_subset(tmp_path / "p", photos, 3)
    (tmp_path / "p" / "ants" / "notes.jpg").write_text("this is not a picture")
    good = [f for f in sorted(os.listdir(os.path.join(photos, "bees"))) if f.endswith(".jpg")][5]
    with open(os.path.join(photos, "bees", good), "rb") as f:
        data = f.read()
    (tmp_path / "p" / "bees" / "cut.jpg").write_bytes(data[: len(data) // 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImagePool(root, image_size=32)
    bad = {ds.paths.index(str(tmp_path / "p" / "ants" / "notes.jpg")),
           ds.paths.index(str(tmp_path / "p" / "bees" / "cut.jpg"))}
    assert len(ds) == 8 and ds.unreadable == bad  # in the pool (positions stay those of the folder), never asked
    assert not any(ds.readable(i) for i in bad) and all(ds.readable(i) for i in set(range(8)) - bad)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "notes.jpg (not a picture in a format Pillow reads)" in message and "cut.jpg" in message
    assert "skipped 2" in message and "BytesIO" not in message


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImagePool(tmp_path / "nope")
    (tmp_path / "empty" / "ants").mkdir(parents=True)
    (tmp_path / "empty" / "bees").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class subfolders|holds no images"):
        ImagePool(tmp_path / "empty")
    with pytest.raises(DatasetError, match="holds no images"):
        ImagePool(tmp_path / "empty", classes=["ants", "bees"])


def draw(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def load_with_one_warning(root, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImagePool(root, image_size=16, **kwargs)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "\n" not in message
    return ds, message


def test_each_real_file_is_used_once_whatever_links_point_at_it(tmp_path):
    root = tmp_path / "pool"
    for i in range(3):
        draw(root / "ants" / f"a{i}.png", (10 * i, 0, 0))
        draw(root / "bees" / f"b{i}.png", (0, 10 * i, 0))
    draw(tmp_path / "elsewhere" / "wasps" / "w0.png", (0, 0, 200))
    draw(tmp_path / "elsewhere" / "w1.png", (0, 0, 100))
    os.symlink(root / "ants", root / "ants" / "loop")  # a loop: every turn would list ants again
    os.symlink(root, root / "bees" / "up")
    os.symlink(tmp_path / "elsewhere" / "wasps", root / "wasps")  # a class folder kept elsewhere
    os.symlink(tmp_path / "elsewhere" / "w1.png", root / "wasps" / "w1.png")
    os.symlink(root / "bees" / "b0.png", root / "ants" / "b0_again.png")  # lies in bees: a bee
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImagePool(root, image_size=16)
    links, message = (str(w.message) for w in caught)  # the folder kept elsewhere, and the skipped entries
    assert links.startswith(f"2 image files in {root} came through links to folders outside it")
    assert ds.class_names == ["ants", "bees", "wasps"]
    assert [os.path.relpath(p, root) for p in ds.paths] == [
        "ants/a0.png", "ants/a1.png", "ants/a2.png", "bees/b0.png", "bees/b1.png", "bees/b2.png",
        "wasps/w0.png", "wasps/w1.png"]
    assert ds.labels == [0, 0, 0, 1, 1, 1, 2, 2]
    assert message.startswith(f"skipped 3 in {root}: 3 links to folders or files already scanned")
    assert "ants/loop" in message and "bees/up" in message and "ants/b0_again.png" in message
    # the labeling window scans first and the pool starts from that scan: the same pool, the same two lines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scanned = (*scan_image_folder(root), [links])
        again = ImagePool(root, image_size=16, scanned=scanned)
    assert [str(w.message) for w in caught] == [links, links, message]  # the scan's own, then the pool's two
    assert (again.paths, again.labels, again.class_names) == (ds.paths, ds.labels, ds.class_names)


def test_gif_is_read_as_its_first_frame_and_other_types_are_named_in_the_warning(tmp_path):
    root = tmp_path / "pool"
    draw(root / "ants" / "a.png", (0, 0, 0))
    frames = [Image.new("RGB", (30, 20), c) for c in ((250, 0, 0), (0, 250, 0))]
    (root / "bees").mkdir()
    frames[0].save(root / "bees" / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for i in range(7):
        (root / "ants" / f"notes{i}.txt").write_text("not a picture")
    (root / "bees" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    ds, message = load_with_one_warning(root)
    assert [os.path.basename(p) for p in ds.paths] == ["a.png", "moving.gif"]
    assert ds.uint8([1])[0, :, 8, 8].tolist() == [250, 0, 0]
    assert "skipped 7" in message and "7 files not an image type" in message
    assert "ants/notes0.txt" in message and "ants/notes4.txt" in message and "and 2 more" in message
    assert "notes5" not in message and "DS_Store" not in message


def test_a_long_strip_costs_no_more_memory_than_a_photo(tmp_path):
    strip = draw(tmp_path / "strip.png", (200, 30, 60), size=(50000, 1))
    photo = draw(tmp_path / "photo.png", (200, 30, 60), size=(400, 300))
    assert strip.stat().st_size < 1000
    # Resizing the short side before the crop would blow this strip up to 64 pixels by 3,200,000.
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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    same_as_photo, grown_mb = json.loads(proc.stdout)
    assert same_as_photo
    assert grown_mb < 50


def counting(monkeypatch, name):
    """Count the calls of dataset.<name> (still doing its work); returns the list of paths it was given."""
    import dataset
    calls, real = [], getattr(dataset, name)
    monkeypatch.setattr(dataset, name, lambda path, *rest: (calls.append(str(path)), real(path, *rest))[1])
    return calls


def test_a_resume_reads_again_only_the_file_that_changed(tmp_path, photos, monkeypatch):
    root = make_subset(tmp_path / "p", photos, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    changed = os.path.join(root, "bees", os.listdir(os.path.join(root, "bees"))[0])
    os.unlink(changed)  # a symlink in the subset: now a file of its own, with other content
    draw(Path(changed), (1, 2, 3), size=(33, 21))
    read = counting(monkeypatch, "inspect_image_file")
    again = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    assert read == [changed]
    assert [h for h, p in zip(again.hashes, again.paths) if p != changed] == \
        [h for h, p in zip(first.hashes, first.paths) if p != changed]
    assert again.hashes[again.paths.index(changed)] != first.hashes[first.paths.index(changed)]


def test_the_pool_is_decoded_lazily_and_a_resume_decodes_nothing_already_decoded(tmp_path, photos, monkeypatch):
    root = make_subset(tmp_path / "p", photos, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    decoded = counting(monkeypatch, "load_image")
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    assert decoded == []  # the first question waits for one decode, not the folder's
    first = ds.batch([5, 1])
    assert sorted(decoded) == sorted([ds.paths[5], ds.paths[1]])
    everything = ds.batch(range(len(ds)))
    assert len(decoded) == len(ds) and ds.decoded.filled() == len(ds)
    ds.decoded.close()
    decoded.clear()
    resumed = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    assert torch.equal(resumed.batch(range(len(ds))), everything) and torch.equal(resumed.batch([5, 1]), first)
    assert decoded == []
    assert [n for n in os.listdir(run_dir) if n.startswith("decoded-")] == [resumed.decoded.path.split(os.sep)[-1]]


def test_an_image_that_stops_decoding_after_the_scan_is_warned_once_and_shown_blank(tmp_path, photos):
    root = make_subset(tmp_path / "p", photos, 3)
    ds = ImagePool(root, image_size=16)
    broken = ds.paths[2]
    os.unlink(broken)
    Path(broken).write_bytes(b"\xff\xd8 no longer a picture")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = ds.batch([0, 2, 2])
        assert not ds.readable(2) and ds.readable(0)
    assert len(caught) == 1 and broken in str(caught[0].message) and "re-save" in str(caught[0].message)
    assert ds.unreadable == {2}
    assert x.shape == (3, 3, 16, 16) and float(x[1].abs().max()) < 0.01  # the mean image: no signal


def png_that_passes_the_header_check_but_does_not_decode(path):
    """A PNG whose chunks and checksums are right but whose pixel data is not zlib data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20, 20, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data" * 9)
                     + chunk(b"IEND", b""))


def test_an_image_found_undecodable_is_named_again_on_resume(tmp_path, photos):
    root = copied_subset(tmp_path / "p", photos, 3)
    png_that_passes_the_header_check_but_does_not_decode(tmp_path / "p" / "ants" / "zz.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    broken = ds.paths.index(os.path.join(root, "ants", "zz.png"))
    with pytest.warns(UserWarning, match="cannot be decoded any more"):
        ds.batch([broken])
    again, message = load_with_one_warning(root, cache_dir=str(run_dir))
    assert again.unreadable == {broken} and "ants/zz.png" in message and "earlier run" in message


def test_a_slow_scan_shows_its_progress_on_one_line_and_a_quick_one_prints_nothing(tmp_path, photos, monkeypatch,
                                                                                  capsys):
    import dataset
    root = make_subset(tmp_path / "p", photos, 3)
    ImagePool(root, image_size=16)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(dataset, "SCAN_PROGRESS_AFTER_S", 0)
    monkeypatch.setattr(dataset, "SCAN_PROGRESS_EVERY_S", 0)
    ImagePool(root, image_size=16)  # no hash cache: every file is read again
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and err.count("\r") > 1  # one line, updated in place
    closing = err.rstrip("\n").split("\r")[-1]
    assert closing.startswith(f"reading {root}:") and "6/6" in closing


def test_a_full_disk_under_the_decoded_cache_is_warned_once_and_images_still_load(tmp_path, photos, monkeypatch):
    import errno

    import decoded_cache
    root = make_subset(tmp_path / "p", photos, 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    expected = ImagePool(root, image_size=16).batch(range(len(ds)))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(decoded_cache.os, "pwrite", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(ds.batch(range(len(ds))), expected) and torch.equal(ds.batch([0]), expected[:1])
    assert len(caught) == 1 and "No space left" in str(caught[0].message) and str(run_dir) in str(caught[0].message)
    assert ds.decoded.filled() == 0 and ds.unreadable == set()  # nothing claimed cached: decoded again next time


def gate_background_reading(monkeypatch):
    """Hold the pool's background reading until the returned event is set (reads from other threads pass);
    returns (event, the paths the background thread read)."""
    import threading

    import dataset
    opened, read, real = threading.Event(), [], dataset.inspect_image_file

    def inspect(path):
        if threading.current_thread().name == "pool-hashes":
            opened.wait(60)
            read.append(str(path))
        return real(path)

    monkeypatch.setattr(dataset, "inspect_image_file", inspect)
    return opened, read


def test_a_new_folder_is_usable_before_its_files_are_read_and_ends_hashed_like_a_full_scan(tmp_path, photos,
                                                                                          monkeypatch):
    root = make_subset(tmp_path / "p", photos, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    full = ImagePool(root, image_size=16)
    opened, read = gate_background_reading(monkeypatch)
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir), hash_in_background=True)
    # returned after reading one file, enough to know the folder holds an image
    assert ds.hashes[0] == full.hashes[0] and ds.hashes[1:] == [None] * 7
    assert torch.equal(ds.batch([5]), full.batch([5])) and ds.hashes[5] == full.hashes[5]  # the asked one at once
    assert ds.hash_of(2) == full.hashes[2]
    ds.start_reading()
    opened.set()
    ds.hasher.join(60)
    assert ds.hashes == full.hashes and ds.arrived[:2] == [5, 2] and sorted(ds.arrived) == list(range(1, 8))
    assert sorted(read) == sorted(p for i, p in enumerate(ds.paths) if i not in (0, 2, 5))  # each file read once
    ds.close()
    again = counting(monkeypatch, "inspect_image_file")
    resumed = ImagePool(root, image_size=16, cache_dir=str(run_dir), hash_in_background=True)
    resumed.start_reading()
    assert again == [] and resumed.hashes == full.hashes and resumed.hasher is None  # nothing left to read


def test_reading_stopped_at_quit_keeps_what_it_read_and_the_next_start_reads_the_rest(tmp_path, photos,
                                                                                      monkeypatch):
    root = make_subset(tmp_path / "p", photos, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    opened, read = gate_background_reading(monkeypatch)
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir), hash_in_background=True)
    ds.hash_of(0), ds.hash_of(7)
    ds.start_reading()
    ds.stop_hashing.set()  # the window closed while the reading was on its first file: it stops after it
    opened.set()
    ds.close()
    assert read == [] or len(read) == 1  # at most the file it was waiting on
    again = counting(monkeypatch, "inspect_image_file")
    resumed = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    assert sorted(again) == sorted(p for i, p in enumerate(ds.paths) if i not in (0, 7) and p not in read)
    assert resumed.hashes == ImagePool(root, image_size=16).hashes


@pytest.mark.parametrize("asked_first", [False, True])
def test_a_file_found_not_an_image_after_the_start_is_warned_once_and_never_asked(tmp_path, photos, monkeypatch,
                                                                                 asked_first):
    # found by the background reading, or asked before the reading reaches it (its header checked then)
    root = copied_subset(tmp_path / "p", photos, 3)
    (tmp_path / "p" / "bees" / "notes.jpg").write_text("this is not a picture")
    opened, _ = gate_background_reading(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImagePool(root, image_size=16, hash_in_background=True)
        bad = ds.paths.index(str(tmp_path / "p" / "bees" / "notes.jpg"))
        assert caught == [] and ds.unreadable == set()  # not known yet
        if asked_first:
            assert not ds.readable(bad) and ds.unreadable == {bad}
        ds.start_reading()
        opened.set()
        ds.hasher.join(60)
        assert ds.unreadable == {bad} and not ds.readable(bad)
        ds.close()
    assert len(caught) == 1 and "bees/notes.jpg" in str(caught[0].message) and "skipped 1" in str(caught[0].message)


def test_a_full_disk_under_the_hash_cache_is_warned_once_and_the_hashes_are_still_known(tmp_path, photos):
    import sqlite3
    root = make_subset(tmp_path / "p", photos, 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    full = ImagePool(root, image_size=16)
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir), hash_in_background=True)
    real_db = ds.hash_cache.db

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def executemany(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

        def close(self):
            real_db.close()

    ds.hash_cache.db = FullDisk()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.start_reading()
        ds.hasher.join(60)
        ds.close()  # commits again: no second warning, no error
    assert ds.hashes == full.hashes
    assert len(caught) == 1 and "disk is full" in str(caught[0].message) and "hashes.sqlite" in str(caught[0].message)
    again = ImagePool(root, image_size=16, cache_dir=str(run_dir), hash_in_background=True)
    # nothing was written: every file is read again (the first at the start), and nothing else lost
    assert again.hashes[0] == full.hashes[0] and len(again.to_read) == len(full) - 1


def test_a_tree_without_links_scans_in_one_read_to_what_the_link_following_walk_finds(tmp_path):
    from dataset import _real_locations, _walk_images, scan_image_folder
    for rel in ["a/x.jpg", "a/b/y.png", "a/b/c/z.gif", "a/.DS_Store", "a/notes.txt", "b/1.jpg", "b/a/2.jpg",
                "B/3.JPG", "a b/4.jpeg", "ab/5.jpg", "a.b/6.jpg", "top.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    found, skipped = scan_image_folder(tmp_path)
    assert (found, skipped) == _walk_images(tmp_path, _real_locations(tmp_path))  # the walk for trees with links
    assert [os.path.relpath(p, tmp_path) for p in found] == [
        "top.png", "B/3.JPG", "a/x.jpg", "a/b/y.png", "a/b/c/z.gif", "a b/4.jpeg", "a.b/6.jpg", "ab/5.jpg",
        "b/1.jpg", "b/a/2.jpg"]
    assert skipped == [(str(tmp_path / "a" / "notes.txt"), "not an image type")]
