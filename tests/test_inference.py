"""inference.py: the batch CLI, checkpoint loading (ours and the original script's), and the window under Xvfb.

    python -m pytest -q tests/test_inference.py

The window test starts its own Xvfb (-displayfd) and leaves its screenshots in /tmp/rlhf-imgcls-screens/.
"""
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import batch_classifier
from checkpoint import CheckpointError
from dataset import load_image, normalize
from models import PolicyModel
from xvfb_display import XvfbDisplay

SCRIPT = os.path.join(REPO, "inference.py")
SCREENS = "/tmp/rlhf-imgcls-screens"


def sample_image(path, source):
    """The picture at source, saved at path in the format its suffix names."""
    Image.open(source).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A run folder with a tiny-input checkpoint (+ runs/latest), and a file in the original script's format."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    policy = PolicyModel(2)
    run = root / "runs" / "tiny_run"
    run.mkdir(parents=True)
    torch.save({"format_version": 1, "policy": policy.state_dict(), "class_names": ["ants", "bees"],
                "image_size": 32, "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "weights_origin": "random", "arch": "resnet18", "finetune": "all", "epoch": 1, "step": 7,
                "episodes": [], "config": {}}, run / "checkpoint.pt")
    os.symlink("tiny_run", root / "runs" / "latest")
    original = root / "rlhf_models.pth"
    torch.save({"policy_model": policy.state_dict(), "reward_model": PolicyModel(2).state_dict()}, original)
    no_classes = root / "no_classes.pt"
    torch.save({"policy": policy.state_dict(), "step": 1}, no_classes)
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    return {"root": root, "run": run, "original": original, "policy": policy, "no_classes": no_classes,
            "garbage": garbage}


@pytest.fixture
def images(tmp_path, photos, digits):
    """A small tree: three readable images (one in a subfolder), a corrupt JPEG and a non-image file."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    good = [sample_image(str(folder / "a.jpg"), os.path.join(photos, "ants", "ant_000.jpg")),
            sample_image(str(folder / "b.png"), os.path.join(photos, "bees", "bee_000.jpg")),
            sample_image(str(folder / "sub" / "c.jpg"), os.path.join(digits, "3", "digit_0000.png"))]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder, good, str(folder / "broken.jpg")


def run_cli(*args, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}  # the CLI must not need a display
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_cli_csv_every_file_once_bad_file_skipped(models, images, tmp_path):
    folder, good, bad = images
    out = tmp_path / "preds.csv"
    # The folder twice and one of its files again: each image must still appear exactly once.
    res = run_cli(folder, folder, good[0], "--model", models["run"], "--csv", out, "--batch-size", "2",
                  "--workers", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "predicted", "prob_ants", "prob_bees"]
    assert sorted(r[0] for r in rows[1:]) == sorted(good)
    for path, predicted, *probs in rows[1:]:
        p = [float(x) for x in probs]
        assert abs(sum(p) - 1) < 1e-4 and predicted == ["ants", "bees"][p.index(max(p))]
    assert f"skipped {bad}:" in res.stderr and "Traceback" not in res.stderr
    assert "3 of 4 images classified" in res.stdout and "1 unreadable" in res.stdout
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_cli_default_model_prints_table(models, images):
    _, good, _ = images
    res = run_cli(good[1], good[0], cwd=models["root"])  # runs/latest in the working folder
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["path", "predicted", "ants", "bees"]
    assert [ln.split()[0] for ln in lines[1:3]] == [good[1], good[0]]
    assert "2 of 2 images classified" in lines[3] and "model tiny_run" in lines[3]


def test_cli_exit_2_when_nothing_readable(models, images, tmp_path):
    _, _, bad = images
    (tmp_path / "notes.png").write_text("not a picture")
    res = run_cli(bad, tmp_path / "notes.png", "--model", models["run"], cwd=tmp_path)
    assert res.returncode == 2
    assert f"skipped {bad}:" in res.stderr and f"skipped {tmp_path / 'notes.png'}:" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: none of the 2 file(s)") and "Traceback" not in res.stderr


ERROR_CASES = {
    # name: (arguments, text the one-line message must hold)
    "no_model_yet": (lambda m, t: ["{img}"], "train first: python train_rlhf.py"),
    "missing_model_file": (lambda m, t: ["{img}", "--model", t / "nope.pt"], "nope.pt"),
    "unreadable_checkpoint": (lambda m, t: ["{img}", "--model", m["garbage"]], "garbage.pt is not a readable"),
    "no_class_names": (lambda m, t: ["{img}", "--model", m["no_classes"]], "no_classes.pt names no classes"),
    "no_images": (lambda m, t: [t / "empty", "--model", m["run"]], "no images found in"),
    "csv_folder_missing": (lambda m, t: ["{img}", "--model", m["run"], "--csv", t / "no" / "out.csv"],
                           "out.csv"),
    "csv_is_a_folder": (lambda m, t: ["{img}", "--model", m["run"], "--csv", t / "empty"], "is a folder"),
    "window_without_display": (lambda m, t: ["--model", m["run"]], "python inference.py IMG_OR_DIR"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_one_line_error_exit_2(case, models, images, tmp_path):
    make_args, expected = ERROR_CASES[case]
    (tmp_path / "empty").mkdir()
    args = [str(a).replace("{img}", images[1][0]) for a in make_args(models, tmp_path)]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
    assert expected in res.stderr, res.stderr
    assert not (tmp_path / "empty" / "out.csv").exists() and not (tmp_path / "no").exists()


def test_original_script_checkpoint(models, images, tmp_path):
    clf = batch_classifier.load_classifier(str(models["original"]))
    assert (clf.class_names, clf.image_size, clf.step) == (["ants", "bees"], 224, None)
    rows = batch_classifier.classify_files(clf, [images[1][0]], workers=0)
    x = normalize(load_image(images[1][0], 224)[None])
    with torch.no_grad():
        expected = torch.softmax(models["policy"].eval()(x), dim=1)[0].tolist()
    assert list(rows[0]["probabilities"].values()) == pytest.approx(expected, abs=1e-4)
    out = tmp_path / "preds.json"
    res = run_cli(images[1][0], "--model", models["original"], "--json", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [d["path"] for d in data] == [images[1][0]] and set(data[0]["probabilities"]) == {"ants", "bees"}


def test_original_format_loads_weights_only(models, tmp_path):
    # A pickled function would run code under weights_only=False; it must be refused instead.
    evil = tmp_path / "evil.pth"
    torch.save({"policy_model": models["policy"].state_dict(), "hook": os.getcwd}, evil)
    with pytest.raises(CheckpointError, match="evil.pth is not a readable checkpoint"):
        batch_classifier.load_classifier(str(evil))


def test_classify_files_order_rows_and_bf16(models, images):
    folder, good, bad = images
    clf = batch_classifier.load_classifier(str(models["run"]))
    files = batch_classifier.list_inputs([str(folder), good[0]])
    assert files == sorted(files) and bad in files and len(files) == 4
    for precision in ("fp32", "bf16"):
        rows = batch_classifier.classify_files(clf, files, batch_size=3, workers=0, precision=precision)
        assert [r["path"] for r in rows] == files
        assert [r["error"] is None for r in rows] == [f != bad for f in files]
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in rows if r["error"] is None)


def xdotool(display, *args):
    return subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": display}, capture_output=True,
                          text=True, timeout=30, check=False)


def wait_for_title(display, pattern, proc, timeout=90):
    """Window id once a window title matches the regex `pattern` (the window's sign of a finished request)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "window exited: " + proc.communicate()[1]
        found = xdotool(display, "search", "--name", pattern).stdout.split()
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no window titled {pattern!r}; titles: "
                         f"{xdotool(display, 'search', '--name', '.', 'getwindowname', '%@').stdout}")


def screenshot(display, name, tmp_path):
    path = tmp_path / name
    subprocess.run(["import", "-display", display, "-window", "root", str(path)], check=True, timeout=30)
    os.makedirs(SCREENS, exist_ok=True)
    shutil.copy(path, os.path.join(SCREENS, name))
    return path


@contextlib.contextmanager
def inference_window(models, folder, tmp_path):
    """The classification window on a private 1024x680 Xvfb, opened on folder: yields (display, process).

    Checks on leaving that the window was closed with ctrl+q, exited 0 and printed no traceback."""
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed")
    missing = [tool for tool in ("xdotool", "import") if not shutil.which(tool)]
    assert not missing, f"install {' and '.join(missing)} (xdotool, ImageMagick) to drive the window test"
    xvfb = XvfbDisplay("1024x680x24")
    proc = None
    try:
        display = xvfb.display
        env = {**os.environ, "DISPLAY": display}
        proc = subprocess.Popen([sys.executable, SCRIPT, "--model", str(models["run"]), "--open", str(folder)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        yield display, proc
        xdotool(display, "key", "ctrl+q")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "Exception in Tkinter callback" not in err, err
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.communicate()
        xvfb.stop()


def assert_canvas_shows_a_picture(shot):
    with Image.open(shot) as img:
        picture = img.convert("RGB").crop((40, 80, 560, 520))  # inside the image canvas
        assert picture.getcolors(100) is None, "the image canvas shows no picture (under 100 colours)"


def test_window_under_xvfb(models, tmp_path, photos, digits):
    folder = tmp_path / "browse"
    folder.mkdir()
    sample_image(str(folder / "1_photo.jpg"), os.path.join(photos, "bees", "bee_001.jpg"))
    (folder / "2_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    sample_image(str(folder / "3_digit.png"), os.path.join(digits, "3", "digit_0000.png"))
    with inference_window(models, folder, tmp_path) as (display, proc):
        win = wait_for_title(display, r"1_photo\.jpg: (ants|bees) [0-9]+%", proc)
        assert_canvas_shows_a_picture(screenshot(display, "inference_window.png", tmp_path))
        xdotool(display, "windowfocus", "--sync", win)
        xdotool(display, "key", "Right")
        wait_for_title(display, r"2_broken\.png: unreadable", proc)
        screenshot(display, "inference_window_error.png", tmp_path)
        xdotool(display, "key", "Right")  # the window is still usable after the bad file
        wait_for_title(display, r"3_digit\.png: (ants|bees) [0-9]+%", proc)


def test_window_shows_a_real_photo(models, tmp_path, shared_data):
    # A screenshot that looks like the product, for a person to judge; drawn pictures cannot tell whether a
    # full-size photo is scaled down to the canvas.
    folder = tmp_path / "browse"
    folder.mkdir()
    os.symlink(os.path.join(shared_data, "hymenoptera_data", "train", "ants", "0013035.jpg"), folder / "ant.jpg")
    with inference_window(models, folder, tmp_path) as (display, proc):
        wait_for_title(display, r"ant\.jpg: (ants|bees) [0-9]+%", proc)
        assert_canvas_shows_a_picture(screenshot(display, "inference_window_photo.png", tmp_path))
