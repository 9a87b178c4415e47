"""Every answer a person gives, committed to SQLite the moment it is given.

One row per image content hash: an image is asked about at most once. `answer` is the class index the
person gave, or NULL for a skip. The store survives a killed process: SQLite's commit is the unit of
durability, so what was committed before a `kill -9` is there after `--resume`.
"""
import json
import sqlite3
import time

SCHEMA_VERSION = 1


class StoreError(Exception):
    """A feedback database that does not belong to this run; the message names the file and the fix."""


class FeedbackStore:
    """The SQLite feedback database of one run (`feedback.sqlite` in the run folder)."""

    def __init__(self, path):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS answers (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    sha1 TEXT NOT NULL UNIQUE,
                    path TEXT NOT NULL,
                    answer INTEGER,
                    predicted INTEGER,
                    probability REAL,
                    sampled INTEGER,
                    reward REAL,
                    policy_version INTEGER,
                    epoch INTEGER,
                    created REAL NOT NULL
                );""")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path} is not a feedback database ({err}): move it away or use a new --out") from None

    def check_classes(self, class_names):
        """Record the class names on first use; refuse a database made for other classes."""
        row = self.db.execute("SELECT value FROM meta WHERE key='class_names'").fetchone()
        if row is None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT INTO meta VALUES ('class_names', ?)", (json.dumps(list(class_names)),))
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            return
        stored = json.loads(row[0])
        if stored != list(class_names):
            raise StoreError(f"{self.path} holds answers for classes {stored}, not {list(class_names)}: "
                             "use the same --images/--classes or a new --out")

    def check_image_set(self, hashes):
        """Refuse a database whose answered images are none of the images in this pool."""
        known = [r[0] for r in self.db.execute("SELECT sha1 FROM answers")]
        if known and not set(known) & set(hashes):
            raise StoreError(f"{self.path} holds {len(known)} answers about other images: "
                             "pass the --images folder the run was made with, or a new --out")

    def add(self, sha1, path, answer, predicted=None, probability=None, sampled=None, reward=None,
            policy_version=None, epoch=None):
        """Commit one answer (None = skip). A second answer for the same image replaces nothing."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT OR IGNORE INTO answers (sha1, path, answer, predicted, probability, sampled, reward,"
                " policy_version, epoch, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (sha1, path, answer, predicted, probability, sampled, reward, policy_version, epoch, time.time()))
        return cur.rowcount == 1

    def remove(self, sha1):
        """Delete an answer (undo); returns True when there was one."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("DELETE FROM answers WHERE sha1=?", (sha1,))
        return cur.rowcount == 1

    def answers(self):
        """{sha1: answer or None (skip)} for every image asked about."""
        return {sha1: answer for sha1, answer in self.db.execute("SELECT sha1, answer FROM answers")}

    def rows(self):
        """All rows as dicts, oldest first."""
        cur = self.db.execute("SELECT * FROM answers ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def counts(self):
        """(answered, skipped)."""
        answered, skipped = self.db.execute(
            "SELECT COUNT(answer), COUNT(*) - COUNT(answer) FROM answers").fetchone()
        return answered, skipped

    def close(self):
        self.db.close()
