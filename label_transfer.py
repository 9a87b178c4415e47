"""Labels in and out of a run: `--export` writes the labels a run holds, `--import-labels` reads labels that
count as answered when a run starts.

    python train_rlhf.py --out RUN --export labels.csv        # or labels.jsonl; --export DIR/ for an ImageFolder
    python train_rlhf.py --out RUN --export labels.csv --autolabel 0.02   # and auto rows (autolabel.py)
    python train_rlhf.py --images DIR --import-labels labels.csv   # or a .jsonl, or an ImageFolder DIR

An export row is one label: the image's path (relative to the run's image folder), its content hash, the
class, how it was given (`label`, `correction` in --ask verdict, `verdict-yes`, `implied` when every other
class was rejected, `imported`), the policy version shown and the time. Each verdict "no" is a row too,
of kind `verdict-no`, with no class and the rejected class in `rejected`: it is not a label, but it is
what complementary-label learners read. Skips and undone answers are no rows. With --autolabel, rows of kind
`auto` follow, with the served model's `probability` (a column only then; empty in the other rows); an import
reads them as labels. Export opens the run's store read-only and takes no lock, so it works while a labeling
session holds the run.

An import matches rows to the pool by content hash (by path when a row has no hash), so renamed or moved
images still match; rows for images or classes the run does not have are counted, never fatal.
"""
import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from answer_ledger import RECHECK, AnswerLedger
from checkpoint import (
    FILE_NAME_BYTES,
    atomic_write_bytes,
    length_limits,
    path_length_problem,
    shortened,
    temp_prefix,
)
from csv_cells import csv_text, restore
from dataset import NOT_A_FILE, file_sha1, open_regular, scan_image_folder
from feedback_store import IMPORTED, FeedbackStore
from user_errors import UserError

COLUMNS = ("path", "sha1", "class", "kind", "rejected", "policy_version", "time")
AUTO_COLUMNS = (*COLUMNS, "probability")  # with --autolabel: the served model's probability of an auto row
LABEL_KEYS = ("class", "sha1", "path", "kind")  # what an import reads of a row, in LabelRow's order
VERDICT_NO = "verdict-no"
AUTO = "auto"  # autolabel.py's rows: the served model's label where its bound allows one
TABLE_SUFFIXES = (".csv", ".jsonl")
# torchvision.datasets.folder.IMG_EXTENSIONS: what ImageFolder reads back (a GIF is not among them)
IMAGE_FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_HELP = ("pass a .csv or .jsonl written by --export (columns class and sha1 or path), or a folder "
                   "with one subfolder per class")


class LabelTransferError(UserError):
    """A label file or export target the tool cannot use; the message names it and the fix."""


# --- export -------------------------------------------------------------------------------------
def export_labels(run_dir, target, max_error=None):
    """Write the labels of the run in run_dir to target (.csv, .jsonl, or a folder as an ImageFolder), with auto
    rows at max_error (--autolabel) when given; returns the one line that says what was written. The run is
    read, never changed."""
    to_folder = is_folder_target(target)
    if to_folder:
        refuse_export_into(run_images(run_dir), target)
    rows = run_label_rows(run_dir)
    auto = None
    if max_error is not None:
        from autolabel import auto_labels  # torch: only an export that asks for auto rows pays for it
        auto = auto_labels(run_dir, max_error)
        rows += relative_rows(auto.rows, run_images(run_dir))
    labels = [r for r in rows if r["class"] and r["kind"] != AUTO]
    if to_folder:
        return folder_export_line(run_dir, target, [r for r in rows if r["class"]], auto)
    write_table(rows, target, AUTO_COLUMNS if auto else COLUMNS)
    nos = sum(1 for r in rows if not r["class"])
    added = f" and {auto.head()}" if auto and auto.calibration.threshold is not None else ""
    return (f"exported {len(labels)} labels ({class_tally(labels)})" + (f" and {nos} verdict-no rows" if nos else "")
            + f"{added} of {run_dir} to {target}" + (f": {auto.tail()}" if auto else ""))


def folder_export_line(run_dir, target, written, auto):
    """Write the ImageFolder (labels, then auto labels) and return its line."""
    present = [r for r in written if os.path.isfile(r["source"])]  # the tally counts what is written
    done, missing = write_image_folder(present, target), len(written) - len(present)
    autos = [r for r in present if r["kind"] == AUTO]
    people = [r for r in present if r["kind"] != AUTO]
    return (f"exported {len(people)} labelled images" + (f" and {len(autos)} auto-labelled" if auto and autos else "")
            + f" of {run_dir} to {target} as an ImageFolder ({class_tally(people)}"
            + (f"; auto: {class_tally(autos)}" if autos else "")
            + f"; {done['links']} hard links, {done['copies']} copies)"
            + (f"; {missing} labelled images no longer at their stored path, left out" if missing else "")
            + (f"; {done['gifs']} GIFs, which torchvision's ImageFolder does not read" if done["gifs"] else "")
            + (f"; {auto.head()}: {auto.tail()}" if auto and auto.calibration.threshold is not None
               else f"; {auto.tail()}" if auto else ""))


def relative_rows(rows, images):
    """Rows with their `path` relative to the run's image folder, as the person's rows have it."""
    for r in rows:
        r["path"] = os.path.relpath(r["source"], images).replace(os.sep, "/")
    return rows


def class_tally(labels):
    counts = Counter(r["class"] for r in labels)
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none yet"


def is_folder_target(target):
    """--export DIR/ or an existing folder: an ImageFolder; otherwise a .csv or .jsonl file."""
    if target.endswith(("/", os.sep)) or os.path.isdir(target):
        return True
    if not target.lower().endswith(TABLE_SUFFIXES):
        raise LabelTransferError(f"--export {target}: write a .csv or .jsonl file, or an ImageFolder: a folder "
                                 "path ending in /")
    return False


def refuse_export_into(images, target):
    """An ImageFolder written inside the run's image folder would become a class of the pool: refused."""
    inside, pool = os.path.realpath(target), os.path.realpath(images)
    if os.path.commonpath([inside, pool]) == pool:
        raise LabelTransferError(f"--export {target}: inside the run's image folder {images}, where it would "
                                 "become a class: pass a folder outside it")


def run_images(run_dir):
    """The image folder of the run in run_dir, as its config.json names it."""
    db, saved = os.path.join(run_dir, "feedback.sqlite"), os.path.join(run_dir, "config.json")
    for needed in (db, saved):
        if not os.path.isfile(needed):
            raise LabelTransferError(f"--export: {run_dir} holds no run (no {os.path.basename(needed)}): pass "
                                     "--out with a run folder")
    try:
        with open(saved, encoding="utf-8") as f:
            images = json.load(f)["images"]
        return os.fspath(images)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LabelTransferError(f"--export: cannot read the image folder from {saved} ({err}): pass --out "
                                 "with a run folder") from None


def run_label_rows(run_dir):
    """Every label and verdict "no" in the run's store, oldest first, as export rows (with `source`: the
    image's path as stored)."""
    images = run_images(run_dir)
    store = FeedbackStore(os.path.join(run_dir, "feedback.sqlite"), read_only=True)
    try:
        names, answers, verdicts, rechecks = store.class_names() or [], store.rows(), store.verdicts(), store.rechecks()
    finally:
        store.close()
    rows = relative_rows(store_label_rows(answers, verdicts, names, rechecks), images)
    return sorted(rows, key=lambda r: r["created"])


def store_label_rows(answers, verdicts, names, rechecks=()):
    """Export rows of the store's answers and verdicts, as the AnswerLedger reads them: a row per label, per
    verdict "no", and per image labelled by rejecting every other class; an answer changed when it was asked
    again (--recheck) is the row of its latest answer, of kind `recheck`."""
    def row(stored, kind, cls, rejected=""):
        return {"source": stored["path"], "sha1": stored["sha1"], "class": cls, "kind": kind, "rejected": rejected,
                "policy_version": stored["policy_version"], "created": stored["created"], "probability": "",
                "time": datetime.fromtimestamp(stored["created"], timezone.utc).isoformat(timespec="seconds")}

    known = range(len(names))
    ledger = AnswerLedger.from_store(answers, verdicts, len(names), rechecks)
    latest = {r["sha1"]: r for r in rechecks}  # oldest first: the last one per image stays
    out = [row(latest[a["sha1"]], RECHECK, names[ledger.label_of[a["sha1"]]])
           if ledger.kind_of.get(a["sha1"]) == RECHECK
           else row(a, "imported" if a.get("kind") == IMPORTED else a.get("kind") or "label", names[a["answer"]])
           for a in answers if a["answer"] in known]
    for v in verdicts:
        if v["proposed"] in known:
            out.append(row(v, "verdict-yes", names[v["proposed"]]) if v["verdict"]
                       else row(v, VERDICT_NO, "", names[v["proposed"]]))
    by_id = {v["id"]: v for v in verdicts}
    for sha1 in ledger.verdict_keys:
        if ledger.is_implied(sha1):  # dated by the last "no", which made it
            last = by_id[ledger.verdicts[ledger.no_keys(sha1)[-1]].row]
            out.append(row(last, "implied", names[ledger.label_of[sha1]]))
    return out


def write_table(rows, target, columns=COLUMNS):
    """rows as CSV (a header line, then one line per row; cells neutralised for spreadsheets) or JSON lines,
    written atomically."""
    if target.lower().endswith(".csv"):
        data = csv_text(columns, [[r[c] for c in columns] for r in rows])
    else:
        data = "".join(json.dumps({c: (r[c] if r[c] != "" else None) for c in columns}) + "\n" for r in rows)
    with writing(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        atomic_write_bytes(target, data.encode("utf-8", FILE_NAME_BYTES))


@contextlib.contextmanager
def writing(target):
    """An OSError while writing the export as one line naming the target."""
    try:
        yield
    except OSError as err:
        raise LabelTransferError(f"--export: cannot write {target} ({err.strerror or err}): pass a writable "
                                 "path (with room on its disk); the run is unchanged") from None


def write_image_folder(labels, target):
    """One subfolder per class with the labelled images (hard links where the file system allows, copies
    otherwise), made beside target and moved into place whole. Returns counts of what it did."""
    folder = os.path.abspath(target)
    if os.path.isdir(folder) and os.listdir(folder):
        raise LabelTransferError(f"--export {target}: the folder already holds files: pass a new or empty "
                                 "folder (the export writes a whole ImageFolder)")
    done = Counter(images=0, links=0, copies=0, gifs=0)
    with writing(target):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        # cut like a file's temporary name, one byte more for the "." after it: a long valid name must work
        building = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=temp_prefix(os.path.basename(folder),
                                                                                      length_limits(folder)[0] - 1)
                                    + ".", suffix=".tmp")
        try:
            taken = set()
            for r in labels:
                dest = image_folder_name(building, r, taken)
                done[link_or_copy(r["source"], dest)] += 1
                done["images"] += 1
                done["gifs"] += not dest.lower().endswith(IMAGE_FOLDER_SUFFIXES)
            os.replace(building, folder)  # onto a new name or an empty folder: readers never see half of it
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return done


def image_folder_name(root, row, taken):
    """root/<class>/<file name>, made unique with the content hash where two images share a name."""
    cls = row["class"].replace(os.sep, "_").strip(".") or "_"
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    name = os.path.basename(row["source"])
    if (cls, name) in taken:
        stem, ext = os.path.splitext(name)
        tag = f"_{row['sha1'][:10]}{ext}"
        while len(os.fsencode(stem + tag)) > length_limits(root)[0]:  # a name near the limit has no room for it
            stem = stem[:-1]
        name = stem + tag
    taken.add((cls, name))
    return os.path.join(root, cls, name)


def link_or_copy(source, dest):
    """A hard link to source at dest (a copy where links fail: another disk, a file system without them)."""
    try:
        os.link(source, dest)
        return "links"
    except OSError:
        shutil.copy2(source, dest)
        return "copies"


# --- import -------------------------------------------------------------------------------------
@dataclass
class LabelRow:
    """One row of a label file: the class named ('' for none), the content hash and path where given."""
    class_name: str
    sha1: str = ""
    path: str = ""
    kind: str = ""

    def __post_init__(self):
        self.sha1 = self.sha1.lower()  # other tools write hashes in capitals; hashlib writes lower case


@dataclass
class ImportReport:
    """What an import did: the labels added ({sha1: pool position}) and the rows left out, by reason."""
    source: str
    rows: int
    added: dict = field(default_factory=dict)
    left_out: Counter = field(default_factory=Counter)
    unknown_classes: set = field(default_factory=set)

    def line(self, pool_root):
        """The one line that reports the import."""
        unknown = ", ".join(sorted(self.unknown_classes)[:5])
        reasons = {"answered": "already answered in this run (kept)", "image": f"for images not in {pool_root}",
                   "class": f"for classes the run does not have ({unknown})",
                   "repeated": "repeating an image already read (the first kept)",
                   "verdict-no": "verdict-no rows (not labels)", "no class": "without a class",
                   "unreadable": "unreadable image files"}
        parts = [f"{n} {reasons[why]}" for why, n in self.left_out.items() if n]
        return (f"--import-labels {self.source}: {self.rows} rows, {len(self.added)} labels added"
                + "".join(f", {p}" for p in parts))


def read_label_source(path):
    """The rows of a label file (.csv, .jsonl) or ImageFolder; LabelTransferError when it cannot be read."""
    too_long = path_length_problem(path, room=0)
    if too_long:  # no file can have that name: "no such file" would send the person looking for one
        raise LabelTransferError(f"--import-labels {shortened(path)}: {too_long}")
    if os.path.isdir(path):
        return read_label_folder(path)
    if not os.path.exists(path):
        raise LabelTransferError(f"--import-labels {path}: no such file or folder: {LABEL_FILE_HELP}")
    if not path.lower().endswith(TABLE_SUFFIXES):
        raise LabelTransferError(f"--import-labels {path}: not a .csv, .jsonl or folder: {LABEL_FILE_HELP}")
    try:
        # open_regular: a FIFO named .csv would block the open forever, and a signal would not end the wait
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            text = f.read()  # -sig: a spreadsheet's byte-order mark
    except OSError as err:
        if err.strerror == NOT_A_FILE:
            raise LabelTransferError(f"--import-labels {path}: not a regular file (a pipe or a device): "
                                     f"{LABEL_FILE_HELP}") from None
        raise LabelTransferError(f"--import-labels {path}: cannot read it ({err.strerror or err}): check its "
                                 f"permissions, or {LABEL_FILE_HELP}") from None
    except UnicodeDecodeError:
        raise LabelTransferError(f"--import-labels {path}: not UTF-8 text: {LABEL_FILE_HELP}") from None
    return read_csv_labels(path, text) if path.lower().endswith(".csv") else read_jsonl_labels(path, text)


def malformed(path, where, what):
    return LabelTransferError(f"--import-labels {path}: {where}: {what}: {LABEL_FILE_HELP}")


def read_csv_labels(path, text):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if "class" not in header or not {"sha1", "path"} & set(header):
            raise malformed(path, "line 1", f"the header names no class, or neither sha1 nor path (it has "
                            f"{', '.join(map(str, header)) or 'nothing'})")
        twice = sorted({k for k in LABEL_KEYS if header.count(k) > 1})
        if twice:  # a reader would take one of the columns, and which one is a guess
            raise malformed(path, "line 1", f"the header is ambiguous: it names {', '.join(twice)} more than once")
        return [LabelRow(*(restore(str(r.get(k) or "").strip()) for k in LABEL_KEYS)) for r in reader]
    except csv.Error as err:
        raise malformed(path, f"line {reader.line_num}", f"not CSV ({err})") from None


def read_jsonl_labels(path, text):
    rows = []
    # A JSON string never holds a raw CR or LF, but may hold U+2028 and the others str.splitlines ends lines at.
    for number, line in enumerate(re.split(r"\r\n?|\n", text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=label_keys_once)
        except LabelKeysTwice as err:
            raise malformed(path, f"line {number}", f"the object is ambiguous: it names {err} more than once") from None
        except ValueError as err:
            raise malformed(path, f"line {number}", f"not JSON ({err})") from None
        except RecursionError:
            raise malformed(path, f"line {number}", "nested too deeply to be a label") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k) or "", str) for k in LABEL_KEYS):
            raise malformed(path, f"line {number}", "not an object with text class, sha1, path (and kind)")
        rows.append(LabelRow(*((obj.get(k) or "").strip() for k in LABEL_KEYS)))
    return rows


class LabelKeysTwice(ValueError):
    """A JSON object that names a key an import reads more than once (the message: those keys)."""


def label_keys_once(pairs):
    """A JSON object as a dict; LabelKeysTwice where a key an import reads is given twice (json keeps the last,
    and which one the other tool meant is a guess)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in LABEL_KEYS if keys.count(k) > 1})
    if twice:
        raise LabelKeysTwice(", ".join(twice))
    return dict(pairs)


def read_label_folder(root):
    """An ImageFolder: each image under root/<class>/ is a label of that class, matched by its content."""
    paths, _ = scan_image_folder(root)
    rows = []
    for p in paths:
        parts = os.path.relpath(p, root).split(os.sep)
        if len(parts) < 2:
            continue  # beside the class folders: no class
        try:
            rows.append(LabelRow(parts[0], file_sha1(p), "/".join(parts)))
        except OSError:
            rows.append(LabelRow(parts[0], "", "", "unreadable"))
    if not rows:
        raise LabelTransferError(f"--import-labels {root}: no images in class subfolders: {LABEL_FILE_HELP}")
    return rows


def plan_import(source, rows, pool, answered):
    """Which rows become labels of the pool (an ImagePool): matched by hash (by path relative to the
    pool's folder when a row has none), of a class the pool has, for an image not in `answered` (hashes)."""
    report = ImportReport(source, len(rows))
    hashes = pool.all_hashes()  # every file read: rows are matched by content
    index_of = {h: i for i, h in enumerate(hashes) if h is not None}
    by_path = {os.path.relpath(p, pool.root).replace(os.sep, "/"): i for i, p in enumerate(pool.paths)}
    chosen = set()
    for r in rows:
        if r.kind == "unreadable":
            why = "unreadable"
        elif not r.class_name:
            why = "verdict-no" if r.kind == VERDICT_NO else "no class"
        else:
            index = index_of.get(r.sha1) if r.sha1 else path_index(by_path, r.path, pool.root)
            why = ("image" if index is None else "class" if r.class_name not in pool.class_names
                   else "repeated" if hashes[index] in chosen
                   else "answered" if hashes[index] in answered else None)
        if why == "class":
            report.unknown_classes.add(r.class_name)
        if why:
            report.left_out[why] += 1
            continue
        chosen.add(hashes[index])
        report.added[hashes[index]] = (index, pool.class_names.index(r.class_name))
    return report


def path_index(by_path, path, root):
    """The pool position of a row's path: as written, else with Windows' \\ separators read as /."""
    exact = by_path.get(pool_relative(path, root))
    return exact if exact is not None else by_path.get(pool_relative(path.replace("\\", "/"), root))


def pool_relative(path, root):
    """A row's path as the pool's relative paths are written ('' matches nothing)."""
    if not path:
        return ""
    rel = os.path.relpath(path, root) if os.path.isabs(path) else path
    return os.path.normpath(rel).replace(os.sep, "/")


def import_labels(store, pool, source, rows):
    """Commit the labels of rows that match the pool to the store, in one transaction, marked as imported;
    returns the ImportReport (its `added`: {sha1: (pool position, class)})."""
    answered = set(store.answers()) | {v["sha1"] for v in store.verdicts()}
    report = plan_import(source, rows, pool, answered)
    store.add_imported([(sha1, pool.paths[i], c) for sha1, (i, c) in report.added.items()])
    return report
