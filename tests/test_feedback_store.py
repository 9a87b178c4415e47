"""Answers are committed the moment they are given and survive a killed process."""
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from feedback_store import FeedbackStore, StoreError


def test_answers_are_kept_once_per_image_and_undo_removes_them(tmp_path):
    store = FeedbackStore(str(tmp_path / "f.sqlite"))
    assert store.add("h1", "a.jpg", 1, predicted=0, probability=0.7, sampled=0, reward=-1.0, policy_version=3)
    assert not store.add("h1", "a.jpg", 0)  # asked at most once: the first answer stays
    assert store.add("h2", "b.jpg", None)
    assert store.answers() == {"h1": 1, "h2": None}
    assert store.counts() == (1, 1)
    assert store.rows()[0]["policy_version"] == 3
    assert store.remove("h1") and not store.remove("h1")
    assert store.answers() == {"h2": None}


def test_store_survives_kill_9(tmp_path):
    db = tmp_path / "f.sqlite"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from feedback_store import FeedbackStore
        s = FeedbackStore({str(db)!r})
        for i in range(25):
            s.add(f"h{{i}}", f"{{i}}.jpg", i % 2)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    store = FeedbackStore(str(db))
    assert len(store.answers()) == 25


def test_store_refuses_other_classes_and_other_images(tmp_path):
    store = FeedbackStore(str(tmp_path / "f.sqlite"))
    store.check_classes(["ants", "bees"])
    store.check_classes(["ants", "bees"])
    with pytest.raises(StoreError, match="f.sqlite holds answers for classes"):
        store.check_classes(["cats", "dogs"])
    store.add("h1", "a.jpg", 0)
    store.check_image_set(["h1", "h9"])
    with pytest.raises(StoreError, match="other images"):
        store.check_image_set(["h7", "h8"])


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "f.sqlite"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="is not a feedback database"):
        FeedbackStore(str(bad))
