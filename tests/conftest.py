"""Shared fixtures: the shared data sets, small image folders made of symlinks, and a CLI runner."""
import json
import os
import sqlite3
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RLHF_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
HYMENOPTERA = os.path.join(SHARED, "hymenoptera_data", "train")
DIGITS = os.path.join(SHARED, "digits", "train")
sys.path.insert(0, ROOT)


def pytest_configure(config):
    if not os.path.isdir(HYMENOPTERA):
        raise pytest.UsageError(f"shared data missing at {HYMENOPTERA}: set RLHF_SHARED_DATA to the shared/data folder")


def make_subset(dest, source, per_class, classes=None, offset=0):
    """A folder of per_class symlinked images for each class of source (sorted, from `offset`)."""
    for cls in classes or sorted(os.listdir(source)):
        os.makedirs(os.path.join(dest, cls), exist_ok=True)
        names = sorted(f for f in os.listdir(os.path.join(source, cls)) if not f.endswith(".gif"))
        for name in names[offset:offset + per_class]:
            os.symlink(os.path.join(source, cls, name), os.path.join(dest, cls, name))
    return str(dest)


@pytest.fixture
def small_pool(tmp_path):
    """12 ants + 12 bees."""
    return make_subset(tmp_path / "pool", HYMENOPTERA, 12)


def run_cli(script, *args, cwd=ROOT, timeout=300, env=None):
    """Run one of the entry scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
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
