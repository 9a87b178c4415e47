"""Shared fixtures: image sets drawn for the tests, the shared real photos where present, small image folders
made of symlinks, and a CLI runner."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

import synthetic_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One test per core (pytest.ini): two processes with two OpenMP threads each on two cores spin against
    # each other and every training step gets ten times slower. Set before torch is imported; subprocesses
    # inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory, monkeypatch):
    """Each test its own per-machine cache (engine measurements, ONNX exports), returned: a measurement made on a
    machine busy with the suite must never become the user's default, and no test may read an earlier one's. Not
    made yet, as on a machine where the tool never ran."""
    folder = tmp_path_factory.mktemp("engine-cache") / "cache"
    monkeypatch.setenv("RLHF_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A folder with ants/ and bees/, 50 photo-like pictures each (JPEG and PNG) and a GIF placeholder in ants/.

    Drawn once per session (a fraction of a second), so that a fresh clone needs nothing beside it."""
    return synthetic_images.photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A folder with 0/ .. 9/, 32 small greyscale PNG digits each."""
    return synthetic_images.digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def shared_data():
    """The shared real data sets (hymenoptera_data/, digits/): ../shared/data beside the clone, or the folder
    RLHF_SHARED_DATA names. A test that asks for them is skipped where they are missing, as on a fresh clone;
    the only way a test module may reach them (test_suite_hygiene.py checks)."""
    path = os.environ.get("RLHF_SHARED_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
    if not os.path.isdir(os.path.join(path, "hymenoptera_data", "train")):
        pytest.skip(f"needs the shared photos (no {path}/hymenoptera_data/train): "
                    "set RLHF_SHARED_DATA to the shared/data folder")
    return path


def make_subset(dest, source, per_class, classes=None, offset=0):
    """A folder of per_class symlinked images for each class of source (sorted, from `offset`)."""
    for cls in classes or sorted(os.listdir(source)):
        os.makedirs(os.path.join(dest, cls), exist_ok=True)
        names = sorted(f for f in os.listdir(os.path.join(source, cls)) if not f.endswith(".gif"))
        # a set too small would otherwise hand the test fewer images than it counts on, without a word
        assert len(names) >= offset + per_class, f"{source}/{cls} holds {len(names)} images"
        for name in names[offset:offset + per_class]:
            os.symlink(os.path.join(source, cls, name), os.path.join(dest, cls, name))
    return str(dest)


def copied_subset(dest, source, per_class, classes=None):
    """make_subset with copies for its links: a pool of plain files, about which the scan says nothing (a pool of
    links to files elsewhere is told in one warning of its own)."""
    root = make_subset(dest, source, per_class, classes=classes)
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            target = os.path.realpath(path)
            os.unlink(path)
            shutil.copy(target, path)
    return root


@pytest.fixture
def small_pool(tmp_path, photos):
    """12 ants + 12 bees."""
    return make_subset(tmp_path / "pool", photos, 12)


def run_cli(script, *args, cwd=ROOT, timeout=300, env=None):
    """Run one of the entry scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def assert_user_error(proc, *needles):
    """Exit code 2, a one-line `error:` message that contains each needle, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def store_rows(run_dir):
    """The answers in a run's feedback.sqlite, oldest first: (sha1, path, answer, policy_version)."""
    with sqlite3.connect(os.path.join(run_dir, "feedback.sqlite")) as db:
        return db.execute("SELECT sha1, path, answer, policy_version FROM answers ORDER BY id").fetchall()


def metrics(run_dir):
    """A run's metrics.jsonl, one dict per line."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def user_error_line(script, *args):
    """The `error:` line that an entry script (train_rlhf.py, inference.py) prints for args, from its main()
    run in this process: for the many bad inputs of one kind, beside a subprocess run of the same kind that
    checks the exit code and that the line is the only one. Only for errors raised before a run folder is
    locked (a lock taken in this process would stay held for the rest of the session)."""
    import importlib

    from user_errors import UserError, first_line
    main = importlib.import_module(os.path.splitext(script)[0]).main
    with pytest.raises(UserError) as err:
        main([str(a) for a in args])
    return "error: " + first_line(err.value)
