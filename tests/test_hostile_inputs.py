"""Hostile input, round three (issue 26): pictures stored sideways or in 16-bit, hidden folders, pipes and
links into the system's folders, odd file names, damaged caches and run files. One test per family."""
import os
import sqlite3
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, copied_subset, make_subset, run_cli
from dataset import NOT_A_FILE, ImagePool, hide_pillow_size_warning, load_image, scan_image_folder
from display import load_picture

TINY = ["--feedback", "folder", "--image-size", "32", "--weights", "none", "--batch-size", "4"]


def recorded(make):
    """What make() returns and the messages it warned, as load_pool sees them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_pillow_size_warning()
        result = make()
    return result, [str(w.message) for w in caught]


def half_white(path, orientation=None, size=(80, 40)):
    """A picture whose left half is white, saved with an EXIF orientation (None: no EXIF at all)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = 255
    img = Image.fromarray(pixels)
    if orientation is None:
        img.save(path, quality=95)
    else:
        exif = img.getexif()
        exif[0x0112] = orientation
        img.save(path, quality=95, exif=exif.tobytes())
    return str(path)


def test_a_phone_photo_stored_sideways_is_learned_and_shown_upright(tmp_path):
    sideways = half_white(tmp_path / "phone.jpg", orientation=6)  # turn 90 degrees clockwise to view
    x = load_image(sideways, 32).float()
    assert x[:, :16].mean() > 200 and x[:, 16:].mean() < 50  # the white half is on top once turned
    assert abs(x[:, :, :16].mean() - x[:, :, 16:].mean()) < 10
    assert load_picture(sideways, (100, 100)).size == (40, 80)  # tall, as the phone was held
    # a picture that needs no turning decodes to the same pixels with the tag or without EXIF at all
    plain, upright = half_white(tmp_path / "plain.jpg"), half_white(tmp_path / "one.jpg", orientation=1)
    assert torch.equal(load_image(plain, 32), load_image(upright, 32))
    # PNG and WebP carry EXIF too, and are turned the same way
    for suffix in (".png", ".webp"):
        x = load_image(half_white(tmp_path / f"phone{suffix}", orientation=6), 32).float()
        assert x[:, :16].mean() > 200 and x[:, 16:].mean() < 50, suffix


def test_a_photo_whose_exif_block_is_damaged_is_used_as_stored(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255
    for cls in ("a", "b"):
        (tmp_path / "pool" / cls).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "pool" / cls / "x.jpg", quality=95,
                                     exif=b"Exif\x00\x00" + b"\xff" * 40)  # no TIFF header inside
    x = load_image(str(tmp_path / "pool" / "a" / "x.jpg"), 32).float()
    assert x[:, :, :16].mean() > 200 and x[:, :, 16:].mean() < 50  # as stored: white on the left
    ds, messages = recorded(lambda: ImagePool(str(tmp_path / "pool"), image_size=16))
    ds.read_hashes(list(ds.to_read))
    assert all(ds.readable(i) for i in range(len(ds))) and ds.unreadable == set() and messages == []


def test_16_bit_and_float_pictures_keep_their_shades(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    expected = load_image(str(tmp_path / "eight.png"), 32).int()
    for name in ("sixteen.png", "float.tif"):
        got = load_image(str(tmp_path / name), 32).int()
        assert (got - expected).abs().max() <= 1, name  # not all white, not all black
        lo, hi = load_picture(str(tmp_path / name), (64, 64)).getextrema()[0]
        assert lo == 0 and hi == 255, name


def test_hidden_folders_are_neither_classes_nor_pool_images(tmp_path, digits):
    root = make_subset(tmp_path / "pool", digits, 3, classes=["3", "8"])
    for hidden in (".thumbnails", "3/.ipynb_checkpoints"):
        make_subset(tmp_path / "pool" / hidden, digits, 2, classes=["5"])
    ds = ImagePool(root, image_size=16)
    assert ds.class_names == ["3", "8"] and len(ds) == 6
    assert not any("/." in p for p in ds.paths)
    # the same with a tree without links, read by the quicker walk
    plain = tmp_path / "plain"
    for cls in ("a", "b", ".thumbnails", "a/.ipynb_checkpoints"):
        (plain / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(plain / cls / "x.png")
    found, skipped = scan_image_folder(plain)
    assert [os.path.relpath(p, plain) for p in found] == ["a/x.png", "b/x.png"] and skipped == []


@pytest.mark.parametrize("with_links", [False, True])
def test_pipes_and_links_into_system_folders_are_never_opened_and_outside_links_are_counted(tmp_path, with_links):
    root = tmp_path / "pool"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(root / cls / f"{i}.png")
    os.mkfifo(root / "a" / "pipe.jpg")  # an open() of it would wait forever for a writer
    if with_links:
        os.symlink("/dev", root / "b" / "dev")
        os.symlink("/proc/self/status", root / "b" / "status.png")
        os.symlink("/dev/zero", root / "b" / "zero.png")
        (tmp_path / "elsewhere").mkdir()
        for i in range(3):
            Image.new("L", (8, 8), 200).save(tmp_path / "elsewhere" / f"{i}.png")
        os.symlink(tmp_path / "elsewhere", root / "c")
    ds, messages = recorded(lambda: ImagePool(str(root), image_size=16))
    names = {os.path.relpath(p, root) for p in ds.paths}
    assert "a/pipe.jpg" not in names and not any(n.startswith("b/dev") for n in names)
    assert (str(root / "a" / "pipe.jpg"), NOT_A_FILE) in ds.skipped
    if with_links:
        assert {"b/status.png", "b/zero.png"}.isdisjoint(names) and len(ds) == 7
        assert sum("came through links to folders outside it" in m for m in messages) == 1
        assert any(m.startswith("3 image files") and "c/0.png" in m for m in messages)
    assert sum(m.startswith("skipped") for m in messages) == 1


def test_links_to_single_files_outside_the_folder_are_counted_in_the_one_line(tmp_path):
    root, elsewhere = tmp_path / "pool", tmp_path / "elsewhere"
    for folder in (root / "a", root / "b", elsewhere / "more"):
        folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), 30 * i).save(elsewhere / f"{i}.png")
        Image.new("L", (8, 8), 30 * i + 5).save(elsewhere / "more" / f"{i}.png")
    Image.new("L", (8, 8), 250).save(root / "a" / "here.png")
    for i in range(4):  # one file at a time, out of the folder: a private photo can come in this way
        os.symlink(elsewhere / f"{i}.png", root / "b" / f"{i}.png")
    os.symlink(root / "a" / "here.png", root / "b" / "again.png")  # within the folder: leaves nothing
    os.symlink(elsewhere / "gone.png", root / "b" / "broken.png")  # leads nowhere: no image of the pool
    ds, messages = recorded(lambda: ImagePool(str(root), image_size=16))
    links = [m for m in messages if "came through links" in m]
    assert links == [links[0]] and "\n" not in links[0]
    assert links[0].startswith(f"4 image files in {root} came through links to files outside it (such as b/0.png)")
    os.symlink(elsewhere / "more", root / "c")  # and a folder: both kinds, still one line
    _, messages = recorded(lambda: ImagePool(str(root), image_size=16))
    assert [m[:m.index(" (")] for m in messages if "came through links" in m] == [
        f"8 image files in {root} came through links to folders and files outside it"]


def test_a_pool_made_of_links_says_so_once_in_a_whole_run(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 4, classes=["3", "8"])  # every image a link to digits/
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", tmp_path / "run", "--epochs", "1",
                   "--max-answers", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("came through links") == 1
    assert f"warning: 8 image files in {pool} came through links to files outside it" in proc.stderr


def test_a_file_name_that_is_not_utf8_is_pooled_cached_and_stored(tmp_path, digits):
    root = make_subset(tmp_path / "pool", digits, 2, classes=["3", "8"])
    source = os.path.join(digits, "3", sorted(os.listdir(os.path.join(digits, "3")))[5])
    odd = os.fsdecode(os.fsencode(os.path.join(root, "3")) + b"/caf\xe9.png")  # Latin-1, as old cameras wrote
    os.symlink(source, odd)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ds = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    i = ds.paths.index(odd)
    assert ds.readable(i) and ds.hash_of(i) is not None
    ds.close()
    again = ImagePool(root, image_size=16, cache_dir=str(run_dir))
    assert not again.to_read and again.hashes == ds.hashes  # every hash, this one's too, from the cache
    again.close()
    from feedback_store import FeedbackStore
    store = FeedbackStore(str(run_dir / "feedback.sqlite"))
    assert store.add(ds.hashes[i], os.path.relpath(odd, root), 0)
    assert store.rows()[0]["path"] == "3/caf\\xe9.png"
    store.close()


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_a_damaged_hash_cache_is_moved_aside_rebuilt_and_the_session_goes_on(tmp_path, digits, damage):
    root = copied_subset(tmp_path / "pool", digits, 4, classes=["3", "8"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ImagePool(root, image_size=16, cache_dir=str(run_dir)).close()
    cache = run_dir / "hashes.sqlite"
    data = cache.read_bytes()
    cache.write_bytes(b"not a database " * 100 if damage == "junk" else data[:len(data) // 2])
    ds, messages = recorded(lambda: ImagePool(root, image_size=16, cache_dir=str(run_dir)))
    assert len(messages) == 1 and "hashes.sqlite is damaged" in messages[0] and "rebuilt" in messages[0]
    assert None not in ds.hashes and len(ds) == 8
    ds.close()
    assert (run_dir / "hashes.sqlite.damaged").exists()
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 8


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "null", "\xff\xfe"])
def test_a_config_that_is_not_a_json_object_is_one_line_on_resume(tmp_path, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(text.encode("latin-1"))
    proc = run_cli("train_rlhf.py", "--out", out, "--resume")
    assert_user_error(proc, str(out / "config.json"), "new --out")
    assert (out / "config.json").read_bytes() == text.encode("latin-1")


def test_a_val_folder_without_the_pools_classes_is_one_line_and_the_pool_itself_is_warned(tmp_path, digits):
    pool = copied_subset(tmp_path / "pool", digits, 4, classes=["3", "8"])
    val = make_subset(tmp_path / "val", digits, 2, classes=["1", "7"])
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--val", val, "--out", out, "--epochs", "1", *TINY)
    assert_user_error(proc, "--val", "none of the classes", "['1', '7']")
    assert not out.exists()
    from train_rlhf import check_val
    ds = ImagePool(pool, image_size=16)
    _, messages = recorded(lambda: check_val(ds, ImagePool(pool, image_size=16, classes=ds.class_names)))
    assert len(messages) == 1 and "is the --images folder" in messages[0]


def test_another_runs_checkpoint_and_a_newer_store_are_refused_untouched(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 4, classes=["3", "8"])
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", out, "--epochs", "1", "--max-answers", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["image_size"] = 64  # as another run's file, put in this folder
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2")
    assert_user_error(proc, "checkpoint.pt", "64 px", "32")
    assert (out / "checkpoint.pt").read_bytes() == before
    with sqlite3.connect(out / "feedback.sqlite") as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.close()
    stored = (out / "feedback.sqlite").read_bytes()
    from feedback_store import FeedbackStore, StoreError
    for read_only in (False, True):
        with pytest.raises(StoreError, match="newer version of the tool"):
            FeedbackStore(str(out / "feedback.sqlite"), read_only=read_only)
    assert (out / "feedback.sqlite").read_bytes() == stored


def test_a_very_large_picture_is_warned_once_naming_it(tmp_path, digits, monkeypatch):
    root = copied_subset(tmp_path / "pool", digits, 2, classes=["3", "8"])
    Image.new("RGB", (40, 40), (90, 90, 90)).save(tmp_path / "pool" / "3" / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)  # 1600 pixels: warned, under twice it: decoded
    ds, at_start = recorded(lambda: ImagePool(root, image_size=16))
    large = ds.paths.index(os.path.join(root, "3", "large.png"))
    _, messages = recorded(lambda: [ds.readable(large), ds.batch([large]), ds.batch(range(len(ds)))])
    assert at_start == [] and len(messages) == 1, (at_start, messages)
    assert "3/large.png is a very large image" in messages[0] and "\n" not in messages[0]
