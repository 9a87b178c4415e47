"""Every answer a person gives, committed to SQLite the moment it is given.

One row per image content hash: an image is asked about at most once. `answer` is the class index the
person gave, or NULL for a skip; `kind` says how it was given (label, correction, skip, or import for a
row from --import-labels; NULL in stores written before the column existed, which gain it when opened).
The store survives a killed process: SQLite's commit is the unit of durability, so what was committed
before a `kill -9` is there after `--resume`.
"""
import contextlib
import json
import os
import sqlite3
import time
from urllib.request import pathname2url

from user_errors import UserError

SCHEMA_VERSION = 3  # 2: answers.kind; 3: the rechecks table
IMPORTED = "import"  # answers.kind of a row from --import-labels
TABLES = {"meta", "answers", "verdicts", "rechecks", "sqlite_sequence"}


class StoreError(UserError):
    """A feedback database that cannot be used or written; the message names the file and the fix."""


class StoreBusyError(StoreError):
    """Another program holds the database's write lock; nothing was written, so the caller may retry."""


class FeedbackStore:
    """The SQLite feedback database of one run (`feedback.sqlite` in the run folder).

    `busy_timeout` is how many seconds a write waits for another program's lock before StoreBusyError;
    `read_only` opens an existing store for reading alone (--export): no table is made, nothing migrated."""

    def __init__(self, path, busy_timeout=5.0, read_only=False):
        self.path = path
        self.busy_timeout = busy_timeout
        if read_only:
            self._check_existing()
            with self._errors():
                self.db = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, timeout=busy_timeout,
                                          isolation_level=None, check_same_thread=False)
            return
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            self._check_existing()
        with self._errors():
            self.db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            with self._errors():
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
                        created REAL NOT NULL,
                        kind TEXT
                    );
                    CREATE TABLE IF NOT EXISTS verdicts (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        sha1 TEXT NOT NULL,
                        path TEXT NOT NULL,
                        proposed INTEGER NOT NULL,
                        behaviour_prob REAL NOT NULL,
                        verdict INTEGER NOT NULL,
                        rule TEXT,
                        policy_version INTEGER,
                        epoch INTEGER,
                        created REAL NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS rechecks (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        sha1 TEXT NOT NULL,
                        path TEXT NOT NULL,
                        earlier INTEGER,
                        answer INTEGER,
                        policy_version INTEGER,
                        epoch INTEGER,
                        created REAL NOT NULL
                    );""")
            self._migrate()
        except BaseException:
            self.db.close()
            raise

    def _migrate(self):
        """Give a store written by an older version the columns this one writes (its rows stay as they are)."""
        def has_kind():
            return "kind" in {r[1] for r in self.db.execute("PRAGMA table_info(answers)")}

        with self._errors():
            if has_kind():  # the usual case takes no write lock
                return
        with self._transaction():  # two connections opening one old store: the second finds the column
            if not has_kind():
                self.db.execute("ALTER TABLE answers ADD COLUMN kind TEXT")
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def _check_existing(self):
        """Refuse a damaged or foreign file before anything writes to it (a read-only connection cannot)."""
        if not os.path.isfile(self.path):
            raise StoreError(f"{self.path} does not exist: pass --out with a run folder")
        with self._errors():
            db = sqlite3.connect(f"file:{_uri_path(self.path)}?mode=ro", uri=True, timeout=self.busy_timeout)
        try:
            with self._errors():
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                # reads every page and index: cheap next to a damaged store written to
                problems = [r[0] for r in db.execute("PRAGMA integrity_check")]
                schema = problems == ["ok"] and "meta" in tables and db.execute(
                    "SELECT value FROM meta WHERE key='schema'").fetchone()
        finally:
            db.close()
        if problems != ["ok"]:
            raise self._damaged(problems[0].replace("\n", " "))
        if tables - TABLES:
            raise StoreError(f"{self.path} is an SQLite database but not a feedback database (tables "
                             f"{sorted(tables)}): move it away or use a new --out")
        if schema and not (str(schema[0]).isdigit() and int(schema[0]) <= SCHEMA_VERSION):
            # its rows may mean what this version cannot know: written to, they would be wrong for both
            raise StoreError(f"{self.path} was written by a newer version of the tool (schema {schema[0]}, this "
                             f"one knows {SCHEMA_VERSION}): use that version, or a new --out; the file is untouched")

    def _damaged(self, detail):
        return StoreError(
            f"{self.path} is damaged ({detail}) and was left as it is: export its answers with "
            f"`sqlite3 {self.path} .recover > answers.sql` (.dump where .recover is missing), load them with "
            "`sqlite3 new.sqlite < answers.sql` and put new.sqlite in its place")

    @contextlib.contextmanager
    def _errors(self):
        """Turn SQLite's errors into StoreError lines that name the file and the fix."""
        try:
            yield
        except sqlite3.Error as err:
            name = getattr(err, "sqlite_errorname", "") or ""
            text = str(err)
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
                raise StoreBusyError(
                    f"{self.path} is held by another program (still locked after {self.busy_timeout:g} s): "
                    "close the other program using it (another train_rlhf.py on this run, an sqlite3 shell); "
                    "the answers saved so far are kept") from None
            if name == "SQLITE_FULL" or "disk is full" in text:
                raise StoreError(f"{self.path}: disk full: free space on the disk that holds it; "
                                 "the answers saved so far are kept") from None
            if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
                raise self._damaged(text) from None
            if name == "SQLITE_NOTADB" or "not a database" in text:
                raise StoreError(f"{self.path} is not a feedback database ({text}): "
                                 "move it away or use a new --out") from None
            if name.startswith("SQLITE_READONLY") or "readonly" in text:
                raise StoreError(f"{self.path} cannot be written ({text}): make the run folder and the file "
                                 "writable, or use a new --out") from None
            raise StoreError(f"{self.path}: {text}: check the disk and the file's permissions, or use a new "
                             "--out") from None

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction: committed whole, or rolled back whole."""
        with self._errors():
            self.db.execute("BEGIN IMMEDIATE")  # takes the write lock first, so the busy timeout applies
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise

    def _write(self, *statements):
        """Run (sql, params) statements in one transaction; returns the last one's cursor."""
        cur = None
        with self._transaction():
            for sql, params in statements:
                cur = self.db.execute(sql, params)
        return cur

    def check_classes(self, class_names):
        """Record the class names on first use; refuse a database made for other classes."""
        stored = self.class_names()
        if stored is None:
            self._write(("INSERT INTO meta VALUES ('class_names', ?)", (json.dumps(list(class_names)),)),
                        ("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)))
            return
        if stored != list(class_names):
            raise StoreError(f"{self.path} holds answers for classes {stored}, not {list(class_names)}: "
                             "use the same --images/--classes or a new --out")

    def check_image_set(self, hashes, all_hashes=None):
        """Refuse a database whose answered images are none of the images in this pool (hashes: those known
        now; all_hashes(): every one, called only when those known share none)."""
        with self._errors():
            known = {r[0] for r in self.db.execute("SELECT sha1 FROM answers UNION SELECT sha1 FROM verdicts")}
        if known and not known & set(hashes) and all_hashes is not None:
            hashes = all_hashes()
        if known and not known & set(hashes):
            raise StoreError(f"{self.path} holds {len(known)} answers about other images: "
                             "pass the --images folder the run was made with, or a new --out")

    def add(self, sha1, path, answer, predicted=None, probability=None, sampled=None, reward=None,
            policy_version=None, epoch=None, kind=None):
        """Commit one answer (None = skip). A second answer for the same image replaces nothing.

        Raises StoreBusyError when another program holds the file: nothing was written, so retry later."""
        return self._write((
            ("INSERT OR IGNORE INTO answers (sha1, path, answer, predicted, probability, sampled, reward,"
             " policy_version, epoch, created, kind) VALUES (?,?,?,?,?,?,?,?,?,?,?)"),
            (sha1, path_text(path), answer, predicted, probability, sampled, reward, policy_version, epoch,
             time.time(), kind))).rowcount == 1

    def add_imported(self, labels):
        """Commit (sha1, path, answer) labels from --import-labels in one transaction, marked kind 'import';
        an image that already has an answer keeps it. Returns how many were added."""
        before, now = self.db.total_changes, time.time()
        self._write(*[("INSERT OR IGNORE INTO answers (sha1, path, answer, created, kind) VALUES (?,?,?,?,?)",
                       (sha1, path_text(path), answer, now, IMPORTED)) for sha1, path, answer in labels])
        return self.db.total_changes - before

    def imported(self):
        """Content hashes of the answers that came from --import-labels."""
        with self._errors():
            return {r[0] for r in self.db.execute("SELECT sha1 FROM answers WHERE kind=?", (IMPORTED,))}

    def class_names(self):
        """The class names the answers index (None before the run's first start)."""
        with self._errors():
            row = self.db.execute("SELECT value FROM meta WHERE key='class_names'").fetchone()
        return None if row is None else json.loads(row[0])

    def remove(self, sha1):
        """Delete an answer (undo); returns True when there was one. Raises StoreBusyError like add."""
        return self._write(("DELETE FROM answers WHERE sha1=?", (sha1,))).rowcount == 1

    def add_verdict(self, sha1, path, proposed, behaviour_prob, verdict, rule, policy_version=None, epoch=None):
        """Commit one verdict (1 yes, 0 no) on the class `proposed` to the person, with the probability the
        proposing rule gave it (behaviour_prob); returns its row id (for undo). Raises StoreBusyError like add."""
        return self._write((
            ("INSERT INTO verdicts (sha1, path, proposed, behaviour_prob, verdict, rule, policy_version, epoch,"
             " created) VALUES (?,?,?,?,?,?,?,?,?)"),
            (sha1, path_text(path), proposed, behaviour_prob, verdict, rule, policy_version, epoch,
             time.time()))).lastrowid

    def remove_verdict(self, row_id):
        """Delete a verdict (undo); returns True when there was one."""
        return self._write(("DELETE FROM verdicts WHERE id=?", (row_id,))).rowcount == 1

    def verdicts(self):
        """Every verdict as a dict, oldest first."""
        return self._table("verdicts")

    def add_recheck(self, sha1, path, earlier, answer, policy_version=None, epoch=None):
        """Commit the answer (None: a skip) to a recheck of an image answered `earlier`; the earlier answer's
        row stays, the latest wins. Returns the row id (for undo). Raises StoreBusyError like add."""
        return self._write((
            "INSERT INTO rechecks (sha1, path, earlier, answer, policy_version, epoch, created) VALUES (?,?,?,?,?,?,?)",
            (sha1, path_text(path), earlier, answer, policy_version, epoch, time.time()))).lastrowid

    def remove_recheck(self, row_id):
        """Delete a recheck's answer (undo); returns True when there was one."""
        return self._write(("DELETE FROM rechecks WHERE id=?", (row_id,))).rowcount == 1

    def rechecks(self):
        """Every recheck's answer as a dict, oldest first."""
        return self._table("rechecks")

    def _table(self, name):
        with self._errors():
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone():
                return []  # read-only, a store written before the table existed
            cur = self.db.execute(f"SELECT * FROM {name} ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur]

    def answers(self):
        """{sha1: answer or None (skip)} for every image asked about."""
        with self._errors():
            return {sha1: answer for sha1, answer in self.db.execute("SELECT sha1, answer FROM answers")}

    def rows(self):
        """All answers as dicts, oldest first."""
        return self._table("answers")

    def counts(self):
        """(answered, skipped)."""
        with self._errors():
            return tuple(self.db.execute(
                "SELECT COUNT(answer), COUNT(*) - COUNT(answer) FROM answers").fetchone())

    def verdict_counts(self):
        """(yes, no)."""
        with self._errors():
            yes, total = self.db.execute("SELECT COALESCE(SUM(verdict), 0), COUNT(*) FROM verdicts").fetchone()
        return yes, total - yes

    def close(self):
        self.db.close()


def path_text(path):
    """A path as SQLite text: a file name that is not UTF-8 shows its odd bytes as \\xNN (answers are keyed by
    content hash, so the path only names the file to a person)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _uri_path(path):
    """A file path as the path part of an SQLite URI (`?` and `#` would end it early)."""
    return pathname2url(os.path.abspath(path))
