"""Content hashes of a pool's image files, remembered in the run folder by (path, size, mtime_ns).

A resume stats each file and re-reads only those whose size or modification time changed, so a folder of
100,000 photos is not read again at every start. The reading of a new folder's files runs in the background
(dataset.py), so rows arrive from that thread while others look up and put. Each row also keeps what the cheap
header check said of the file ("" when it looks like a readable image), so an unreadable file is not opened again
either.
"""
import os
import sqlite3
import threading
import warnings

HASH_CACHE_NAME = "hashes.sqlite"


def _key(path):
    # A file name that is not UTF-8 (its bytes kept as surrogates) cannot be SQLite text: its bytes are the key.
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


class HashCache:
    """(sha1, problem) per file, keyed by path, size and mtime_ns; in memory when folder is None. Safe to use
    from several threads (the pool's background reading puts and commits while a worker looks up)."""

    def __init__(self, folder=None):
        self.path = os.path.join(folder, HASH_CACHE_NAME) if folder else ":memory:"
        self.lock = threading.Lock()
        try:
            self._open()
        except sqlite3.DatabaseError as err:
            # only a cache: a damaged one costs a reading of the files, never the session
            self.db.close()
            for suffix in ("", "-journal"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, self.path + ".damaged" + suffix)
            warnings.warn(f"{self.path} is damaged ({err}): moved to {self.path}.damaged and rebuilt; the image "
                          "files are read again for their content hashes", stacklevel=2)
            self._open()
        self.fresh, self.write_failed = [], False

    def _open(self):
        # Connect, make the table and read every row (a damaged file fails here, not in the middle of a session).
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                        "mtime_ns INTEGER, sha1 TEXT, problem TEXT)")
        self.db.commit()
        self.known = {row[0]: row[1:] for row in self.db.execute("SELECT * FROM files")}

    def lookup(self, path, st):
        """The cached (sha1, problem) of path when its size and mtime_ns are st's, else None."""
        row = self.known.get(_key(path))
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2], row[3]
        return None

    def put(self, path, size, mtime_ns, sha1, problem):
        """Remember a file's hash and header verdict (written by commit())."""
        with self.lock:
            self.known[_key(path)] = (size, mtime_ns, sha1, problem)
            self.fresh.append((_key(path), size, mtime_ns, sha1, problem))

    def pending(self):
        """Rows put since the last commit."""
        return len(self.fresh)

    def commit(self):
        """Write the rows added since the last commit in one transaction. A failed write (a full disk) is
        warned about once and costs only time: those files are read again at the next start."""
        with self.lock:
            rows, self.fresh = self.fresh, []
            if not rows:
                return
            try:
                with self.db:
                    self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as err:
                if not self.write_failed:
                    self.write_failed = True
                    warnings.warn(f"cannot write content hashes to {self.path} ({err}): the files read in this "
                                  "session are read again at the next start; free space on its disk", stacklevel=2)

    def close(self):
        self.commit()
        with self.lock:
            self.db.close()
