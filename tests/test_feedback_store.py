"""Answers are committed the moment they are given and survive a killed process."""
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from feedback_store import FeedbackStore, StoreBusyError, StoreError


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
    proc = subprocess.run([sys.executable, "-c", code], check=False)
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
    # a pool whose hashes are still being read: those known share none, so it asks for all of them
    store.check_image_set(["h7", None], all_hashes=lambda: ["h7", "h1"])
    with pytest.raises(StoreError, match="other images"):
        store.check_image_set(["h7", None], all_hashes=lambda: ["h7", "h8"])


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "f.sqlite"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="is not a feedback database"):
        FeedbackStore(str(bad))


def filled_store(path, n=300):
    store = FeedbackStore(str(path), busy_timeout=0.2)
    store.check_classes(["ants", "bees"])
    for i in range(n):
        store.add(f"{i:040x}", f"/pool/ants/{i}.jpg", i % 2, predicted=0, probability=0.5, policy_version=i)
    return store


def test_a_damaged_page_is_found_at_open_and_the_file_is_left_as_it_is(tmp_path):
    path = tmp_path / "f.sqlite"
    filled_store(path).close()
    data = bytearray(path.read_bytes())
    pages = len(data) // 4096
    assert pages > 8
    middle = pages // 2 * 4096
    data[middle:middle + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        FeedbackStore(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path} is damaged" in message and f"sqlite3 {path} .recover" in message
    assert path.read_bytes() == bytes(data)


def test_a_store_locked_by_another_program_raises_busy_and_keeps_every_answer(tmp_path):
    path = tmp_path / "f.sqlite"
    store = filled_store(path, n=5)
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreBusyError, match=re.escape(f"{path} is held by another program")):
        store.add("new", "/pool/bees/new.jpg", 1)
    with pytest.raises(StoreBusyError):
        store.remove(f"{0:040x}")
    assert len(store.answers()) == 5
    other.execute("ROLLBACK")
    other.close()
    assert store.add("new", "/pool/bees/new.jpg", 1)  # the caller kept the answer and retried
    assert store.remove(f"{0:040x}")
    store.close()
    assert len(FeedbackStore(str(path)).answers()) == 5


def test_a_full_disk_is_a_store_error_that_keeps_the_saved_answers(tmp_path):
    path = tmp_path / "f.sqlite"
    store = filled_store(path, n=5)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, as from a full disk
    with pytest.raises(StoreError, match=re.escape(f"{path}: disk full: free space on the disk that holds it")):
        for i in range(1000):
            store.add(f"big{i}" * 20, "x" * 500, 0)
    store.close()
    rows = FeedbackStore(str(path)).rows()
    assert [r["path"] for r in rows[:5]] == [f"/pool/ants/{i}.jpg" for i in range(5)]


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "f.sqlite"
    with sqlite3.connect(str(path)) as db:
        db.execute("CREATE TABLE photos (name TEXT)")
        db.execute("INSERT INTO photos VALUES ('x')")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="is an SQLite database but not a feedback database"):
        FeedbackStore(str(path))
    assert path.read_bytes() == before
