"""The labeling window as a person uses it: a real Tk window on a private Xvfb, keys sent with xdotool,
and the SQLite store checked for exactly the answers given. The app's RLHF_GUI_EVENTS log tells the
test when the window has shown the next image, so the test waits on state, never on the clock."""
import ctypes
import ctypes.util
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageChops, ImageStat

import synthetic_images
from conftest import ROOT, assert_user_error, make_subset, store_rows
from xvfb_display import XvfbDisplay, XvfbError

SCREENS = "/tmp/rlhf-imgcls-screens"
TINY = ["--feedback", "gui", "--image-size", "32", "--weights", "none", "--batch-size", "4", "--epochs", "1"]
WAIT_S = 120  # a hung window fails the test instead of hanging it
STARTED = []  # every app process, so that a failed test leaves none running


@pytest.fixture(scope="module")
def display():
    """A private Xvfb (it picks a free display number itself)."""
    if not (shutil.which("Xvfb") and shutil.which("xdotool") and shutil.which("import")):
        pytest.skip("the window tests need Xvfb, xdotool and ImageMagick's import")
    try:
        xvfb = XvfbDisplay()
    except XvfbError as err:
        pytest.fail(str(err))
    yield xvfb.display
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reads and closes its pipes (a killed app's left open warn at exit)
    xvfb.stop()


@pytest.fixture
def pool(tmp_path, photos):
    """10 ants + 10 bees."""
    return make_subset(tmp_path / "pool", photos, 10)


class Session:
    """train_rlhf.py --feedback gui on the test display, with its event log and its window."""

    def __init__(self, display, tmp_path, *args, env=None):
        self.display = display
        self.log = tmp_path / f"events-{time.monotonic_ns()}.jsonl"
        env = {**os.environ, "DISPLAY": display, "RLHF_GUI_EVENTS": str(self.log), "PYTHONUNBUFFERED": "1",
               **(env or {})}
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rlhf.py"), *map(str, args)],
                                     cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        STARTED.append(self.proc)
        self.wait_for("shown")
        self.window = self.xdotool("search", "--onlyvisible", "--name", "^rlhf-imgcls").split()[0]
        self.xdotool("windowfocus", "--sync", self.window)

    def xdotool(self, *args):
        return subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": self.display}, check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def events(self, kind=None):
        if not self.log.exists():
            return []
        lines = self.log.read_text().split("\n")[:-1]  # the last piece may be a line being written
        return [e for e in map(json.loads, lines) if kind is None or e["kind"] == kind]

    def wait_for(self, kind, count=1):
        deadline = time.monotonic() + WAIT_S
        while len(self.events(kind)) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"the app ended (rc {self.proc.returncode}) before {count} {kind} events: "
                            + self.proc.stderr.read())
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {count} {kind} events within {WAIT_S}s: {self.events()}")
            time.sleep(0.05)
        return self.events(kind)

    def keys(self, *keys):
        """Press keys one by one, each time waiting until the window shows the image that follows."""
        for key in keys:
            shown = len(self.events("shown"))
            self.xdotool("key", key)
            if key not in ("q", "Escape"):
                self.wait_for("shown", shown + 1)

    def screenshot(self, name):
        path = os.path.join(SCREENS, name)
        os.makedirs(SCREENS, exist_ok=True)
        subprocess.run(["import", "-window", self.window, path], env={**os.environ, "DISPLAY": self.display},
                       check=True, timeout=30)
        return path

    def finish(self):
        out, err = self.proc.communicate(timeout=WAIT_S)
        return self.proc.returncode, out, err


def send_wm_delete(display, window):
    """What a window manager sends when the person clicks the window's close button (WM_DELETE_WINDOW)."""
    class ClientMessage(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                    ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                    ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]

    class XEvent(ctypes.Union):
        _fields_ = [("xclient", ClientMessage), ("pad", ctypes.c_long * 24)]

    x11 = ctypes.cdll.LoadLibrary(ctypes.util.find_library("X11"))
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.POINTER(XEvent)]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    dpy = x11.XOpenDisplay(display.encode())
    assert dpy, f"cannot open {display}"
    event = XEvent()
    event.xclient.type, event.xclient.window, event.xclient.format = 33, int(window), 32  # 33: ClientMessage
    event.xclient.message_type = x11.XInternAtom(dpy, b"WM_PROTOCOLS", False)
    event.xclient.data[0] = x11.XInternAtom(dpy, b"WM_DELETE_WINDOW", False)
    assert x11.XSendEvent(dpy, int(window), False, 0, ctypes.byref(event))
    x11.XFlush(dpy)
    x11.XCloseDisplay(dpy)


def store(run_dir):
    return {path: (answer, version) for _, path, answer, version in store_rows(run_dir)}


def answers(run_dir):
    return {path: answer for path, (answer, _) in store(run_dir).items()}


def question_paths(session):
    """Pool path of each question, by its number in the session."""
    return {e["seq"]: e["path"] for e in session.events("shown")}


def test_keys_answer_skip_undo_and_quit_and_the_store_holds_exactly_the_answers(display, tmp_path, pool):
    out = tmp_path / "run"
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY)
    s.keys("0", "1", "s", "1")   # questions 0-3; the fourth answer makes an update due
    s.keys("u")                  # question 3 is asked again ...
    s.keys("0", "BackSpace", "BackSpace")  # ... answered 0, undone, and the skip of question 2 undone too
    s.keys("1", "0")             # question 2 answered 1, question 3 answered 0
    s.wait_for("metrics")
    s.keys("u")                  # question 3 once more: its answer has trained, so the reward model is refit
    s.wait_for("refit")
    s.keys("0")
    shot = s.screenshot("labeling_window.png")
    shutil.copy(shot, tmp_path / "labeling_window.png")
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    paths = question_paths(s)
    assert answers(out) == {paths[0]: 0, paths[1]: 1, paths[2]: 1, paths[3]: 0}
    assert all(version == 0 for _, version in store(out).values())  # every guess came before the first update
    titles = [e["title"] for e in s.events("shown")]
    assert titles[0] == f"rlhf-imgcls  1/20  {os.path.basename(paths[0])}"
    first = s.events("first_shown")[0]  # a picture of the pool came before torch started loading
    assert first["torch_loaded"] is False and first["t"] < s.events("shown")[0]["t"]
    assert [e["seq"] for e in s.events("shown")] == [0, 1, 2, 3, 4, 3, 4, 3, 2, 3, 4, 3, 4]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 1
    picture = Image.open(shot).convert("L")
    assert picture.size[0] >= 480 and ImageStat.Stat(picture).stddev[0] > 10, "blank screenshot"


def verdict_rows(run_dir):
    with sqlite3.connect(os.path.join(run_dir, "feedback.sqlite")) as db:
        return db.execute("SELECT path, proposed, behaviour_prob, verdict FROM verdicts ORDER BY id").fetchall()


def test_verdicts_yes_no_a_correction_skip_undo_and_resume_are_stored_row_by_row(display, tmp_path, digits):
    out = tmp_path / "run"
    three = make_subset(tmp_path / "three", digits, 5, classes=["1", "4", "7"])
    s = Session(display, tmp_path, "--images", three, "--out", out, *TINY, "--ask", "verdict", "--order",
                "sequential")
    s.keys("y", "n", "2", "s", "n")
    s.keys("u")                      # the no to question 4 is taken back: question 4 again ...
    s.keys("y")                      # ... answered yes
    shot = s.screenshot("labeling_window_verdict.png")
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    shown = {e["seq"]: e for e in s.events("shown")}
    rows = verdict_rows(out)
    assert [(path, proposed, verdict) for path, proposed, _, verdict in rows] == [
        (shown[0]["path"], shown[0]["proposed"], 1), (shown[1]["path"], shown[1]["proposed"], 0),
        (shown[4]["path"], shown[4]["proposed"], 1)]
    assert all(0 < p <= 1 for _, _, p, _ in rows)  # the logged probability of each proposal
    assert answers(out) == {shown[2]["path"]: 2, shown[3]["path"]: None}  # the correction and the skip
    assert ImageStat.Stat(Image.open(shot).convert("L")).stddev[0] > 10, "blank screenshot"

    again = Session(display, tmp_path, "--out", out, "--resume")
    first = again.events("shown")[0]
    assert first["path"] == shown[1]["path"] and first["proposed"] != shown[1]["proposed"]  # never re-proposed
    again.keys("n", "Escape")
    rc, _, stderr = again.finish()
    assert rc == 0, stderr
    assert verdict_rows(out)[:3] == rows and verdict_rows(out)[3][0] == shown[1]["path"]


def test_closing_the_window_during_an_update_loses_nothing(display, tmp_path, pool):
    out = tmp_path / "run"
    # Bigger images and more PPO passes, so the update is still running when the window closes.
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--image-size", "64",
                "--update-epochs", "6")
    s.keys("1", "0", "1", "1")
    s.wait_for("update_started")
    s.keys("0", "s")  # the window keeps answering while the update runs
    send_wm_delete(display, s.window)
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    quit_event, = s.events("quit")
    assert quit_event["update_running"], "the window closed after the update, not during it"
    kinds = [e["kind"] for e in s.events() if e["kind"] in ("shown", "metrics")]
    assert kinds.index("metrics") == len(kinds) - 1, "answers during the update waited for it"
    paths = question_paths(s)
    assert answers(out) == {paths[0]: 1, paths[1]: 0, paths[2]: 1, paths[3]: 1, paths[4]: 0, paths[5]: None}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1  # the update finished, then saved


def test_sigterm_keeps_the_answers_and_resume_reopens_at_the_first_unanswered_image(display, tmp_path, pool):
    out = tmp_path / "run"
    # The epoch's seeded order (--order uncertain would reopen at the least sure unanswered image).
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--order", "random", "--image-size", "16")
    s.keys("0", "1", "0")
    waiting = s.events("shown")[-1]
    s.proc.send_signal(signal.SIGTERM)
    rc, _, stderr = s.finish()
    assert rc == 128 + signal.SIGTERM, stderr  # the usual exit code of a signal, once everything is saved
    paths = question_paths(s)
    assert answers(out) == {paths[0]: 0, paths[1]: 1, paths[2]: 0}
    assert (out / "checkpoint.pt").is_file()

    again = Session(display, tmp_path, "--out", out, "--resume")
    first = again.events("shown")[0]
    assert (first["title"], first["path"]) == (waiting["title"], waiting["path"])
    again.keys("1", "Escape")
    rc, _, stderr = again.finish()
    assert rc == 0, stderr
    assert answers(out) == {paths[0]: 0, paths[1]: 1, paths[2]: 0, first["path"]: 1}


def test_after_the_last_question_training_finishes_the_epochs_and_the_window_says_so(display, tmp_path, photos):
    out = tmp_path / "run"
    pool = make_subset(tmp_path / "small", photos, 4)  # 8 images: 2 left unanswered for the reward model
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--epochs", "2", "--max-answers", "6",
                "--rm-min-answers", "4", "--image-size", "16", "--update-epochs", "1")
    s.keys("0", "1", "1", "s", "0")
    s.xdotool("key", "1")  # the last question: no image follows it
    s.wait_for("done")
    assert s.xdotool("getwindowname", s.window).strip() == "rlhf-imgcls  done"
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    assert len(answers(out)) == 6 and sum(a is None for a in answers(out).values()) == 1
    assert [e["epoch"] for e in s.events("epoch")] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert (out / "training_data.json").is_file()


def test_a_training_crash_reaches_the_window_and_keeps_every_answer(display, tmp_path, pool):
    out = tmp_path / "run"
    # A fault injected where no flag can reach: the policy's update raises, as a bug in training would.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import optimum_fit, ppo\n\ndef broken(*args, **kwargs):\n    raise ValueError('injected fault')\n\n"
        "ppo.ppo_loss = broken\noptimum_fit.optimum_update = broken\n")
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY,
                env={"PYTHONPATH": os.pathsep.join([str(inject), ROOT])})
    s.keys("0", "0", "1", "1")
    error, = s.wait_for("error")
    assert "training stopped: ValueError" in error["text"] and "--resume" in error["text"]
    s.screenshot("labeling_window_error.png")
    s.keys("1", "q")  # answers still go to the store
    rc, _, stderr = s.finish()
    assert rc == 1 and "training stopped: ValueError" in stderr
    assert len(answers(out)) == 5


def test_more_classes_than_digit_keys_are_refused_for_the_window(display, tmp_path, digits):
    many = make_subset(tmp_path / "many", digits, 1)
    for extra in ("a", "b"):  # 12 classes: 0-9, a, b (copies: a second link to one file counts once)
        shutil.copytree(os.path.join(many, "0"), os.path.join(many, extra))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", many, "--out",
                           str(tmp_path / "run"), *TINY], env={**os.environ, "DISPLAY": display}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert_user_error(proc, "12 classes", "--feedback folder")
    assert not (tmp_path / "run").exists()


def test_without_a_display_one_line_names_the_ways_out(tmp_path, pool):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", pool,
                           "--out", str(tmp_path / "run"), *TINY], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert_user_error(proc, "--feedback folder", "xvfb-run")


def test_the_window_shows_its_first_image_without_importing_torch():
    code = ("import sys, train_rlhf, first_images\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=WAIT_S)


def early_window(display, monkeypatch, cfg, run_dir):
    """FirstImages on the test display, in this process, with its window found for xdotool."""
    import first_images
    monkeypatch.setenv("DISPLAY", display)
    root = first_images.open_root()
    first = first_images.FirstImages(root, cfg, str(run_dir))
    root.deiconify()
    root.update()
    found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "^rlhf-imgcls  loading"],
                           env={**os.environ, "DISPLAY": display}, capture_output=True, text=True, timeout=30)
    return root, first, found.stdout.split()[0]


def early_key(display, root, first, window, key):
    """Press key in the loading window and wait until its answer is stored."""
    given = len(first.answers)
    env = {**os.environ, "DISPLAY": display}
    subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, check=True, timeout=30)
    subprocess.run(["xdotool", "key", key], env=env, check=True, timeout=30)
    deadline = time.monotonic() + WAIT_S
    while len(first.answers) == given and time.monotonic() < deadline:
        root.update()
        time.sleep(0.01)
    assert len(first.answers) == given + 1, f"{key} gave no answer"


def test_answers_given_while_the_model_loads_are_stored_without_a_guess_and_learnt_as_new(display, tmp_path, pool,
                                                                                       monkeypatch):
    import train_rlhf
    from ddp import Ranks
    from run_config import RunConfig
    cfg = RunConfig(images=str(pool), feedback="gui", image_size=32, weights="none", batch_size=4, epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    root, first, window = early_window(display, monkeypatch, cfg, run_dir)
    try:
        one = first.current[0]
        early_key(display, root, first, window, "1")
        import dataset
        scans, scan = [], dataset.scan_image_folder
        monkeypatch.setattr(dataset, "scan_image_folder", lambda folder: scans.append(folder) or scan(folder))
        _, run = train_rlhf.start(cfg, str(run_dir), Ranks(), "cpu", window=True,  # reads the store: one answer
                                  scanned=first.scanned)
        assert scans == [] and run.ds.paths == first.scanned[0]  # the window's scan: the folder is listed once
        two = first.current[0]
        early_key(display, root, first, window, "0")  # the run has not read this one
        with sqlite3.connect(run_dir / "feedback.sqlite") as db:
            rows = db.execute("SELECT path, answer, predicted, probability, kind FROM answers ORDER BY id").fetchall()
        assert rows == [(one, 1, None, None, "label"), (two, 0, None, None, "label")]
        assert first.hand_over(run) == 2
        at = {p: i for i, p in enumerate(run.ds.paths)}
        assert run.answer_of[at[one]] == 1 and run.answer_of[at[two]] == 0
        # both wait for the next update as new answers, which the reward model has not been fitted on
        assert sorted(run.training.pending) == sorted([at[one], at[two]])
        assert not {at[one], at[two]} & run.training.rm_fitted and not run.shown_of
        run.ds.close()
        run.store.close()
        import first_images  # as --resume starts: the answered images are never shown again
        again = first_images.FirstImages(root, cfg, str(run_dir))
        shown = []
        while again.current is not None:
            shown.append(again.current[0])
            again.give(skip=True)
        assert sorted(shown) == sorted(set(run.ds.paths) - {one, two})
    finally:
        root.destroy()


def test_verdicts_while_the_model_loads_put_a_uniform_class_logged_at_one_over_k(display, tmp_path, digits,
                                                                                 monkeypatch):
    import train_rlhf
    from ddp import Ranks
    from run_config import RunConfig
    pool = make_subset(tmp_path / "pool", digits, 2, classes=["3", "5", "8"])
    cfg = RunConfig(images=str(pool), feedback="gui", ask="verdict", image_size=16, weights="none", batch_size=4,
                    epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    root, first, window = early_window(display, monkeypatch, cfg, run_dir)
    try:
        one, _, yes_to = first.current
        early_key(display, root, first, window, "y")
        two, _, no_to = first.current
        early_key(display, root, first, window, "n")
        assert verdict_rows(run_dir) == [(one, yes_to, pytest.approx(1 / 3), 1), (two, no_to, pytest.approx(1 / 3), 0)]
        _, run = train_rlhf.start(cfg, str(run_dir), Ranks(), "cpu", window=True)
        first.hand_over(run)
        at = {p: i for i, p in enumerate(run.ds.paths)}
        assert run.answer_of[at[one]] == yes_to and at[two] not in run.answer_of
        assert [(v.image, v.proposed, v.verdict) for v in run.ledger.verdicts] == [(at[one], yes_to, 1),
                                                                                  (at[two], no_to, 0)]
        assert at[one] in run.training.pending and run.training.pending_no  # learnt as new, the no included
        run.ds.close()
        run.store.close()
    finally:
        root.destroy()


def test_the_headless_path_and_the_training_modules_never_import_tkinter():
    code = ("import sys, train_rlhf, ppo, models, learner, rlhf_run\n"
            "assert 'tkinter' not in sys.modules, 'tkinter imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=WAIT_S)


def test_an_answer_the_store_refuses_stays_on_screen_and_is_saved_once_the_store_is_free(display, tmp_path, pool):
    out = tmp_path / "run"
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY)
    s.keys("0")
    holder = sqlite3.connect(out / "feedback.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    shown = len(s.events("shown"))
    s.xdotool("key", "1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(s.events("key")) < 2:
        time.sleep(0.05)
    time.sleep(1.5)  # the window's commit waits 0.5 s for the lock, then keeps the answer
    assert len(s.events("shown")) == shown, "a key was acknowledged before its answer was on disk"
    s.screenshot("labeling_window_store_busy.png")
    holder.execute("ROLLBACK")
    holder.close()
    s.wait_for("shown", shown + 1)  # retried: saved, and the next image follows
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    paths = question_paths(s)
    assert answers(out) == {paths[0]: 0, paths[1]: 1}


def wait_for_status(session, predicate):
    """The newest status line once it satisfies predicate (the status line is drawn just after the image)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lines = [e["text"] for e in session.events("status")]
        if lines and predicate(lines[-1]):
            return lines[-1]
        if time.monotonic() > deadline or session.proc.poll() is not None:
            pytest.fail(f"no such status line: {lines[-1:] or 'none'}")
        time.sleep(0.05)


def test_lopsided_answers_are_counted_beside_the_bars_and_warned_about_in_the_status_line(display, tmp_path, photos):
    out = tmp_path / "run"
    pool = make_subset(tmp_path / "pool", photos, 12)
    # no update is due within the 20 answers: the counts and the warning need none
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--order", "random", "--batch-size", "32",
                "--image-size", "16")
    s.keys(*["0"] * 16, *["1"] * 3)
    assert s.events("shown")[-1]["counts"] == [16, 3]
    line = wait_for_status(s, lambda text: text.startswith("19 answered"))
    assert "warning" not in line  # bees are under half their share, but 19 answers are too few to say so
    s.keys("1")
    line = wait_for_status(s, lambda text: text.startswith("20 answered"))
    assert "warning: answers lopsided: bees: 4 of 20 (fair share 10)" in line
    s.xdotool("key", "c")
    assert s.wait_for("chart")[-1]["view"] == "share"
    shot = s.screenshot("labeling_window_class_share.png")
    s.keys("u")  # 19 answers again: the warning goes
    assert "warning" not in wait_for_status(s, lambda text: text.startswith("19 answered"))
    assert s.events("shown")[-1]["counts"] == [16, 3]
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    assert sorted(answers(out).values()) == [0] * 16 + [1] * 3
    assert ImageStat.Stat(Image.open(shot).convert("L")).stddev[0] > 10, "blank screenshot"


def test_ten_classes_on_a_small_screen_show_the_whole_image(tmp_path):
    if not (shutil.which("Xvfb") and shutil.which("xdotool") and shutil.which("import")):
        pytest.skip("the window tests need Xvfb, xdotool and ImageMagick's import")
    pool = synthetic_images.framed(tmp_path / "framed")
    with XvfbDisplay(screen="1024x700x24") as small:
        s = Session(small.display, tmp_path, "--images", pool, "--out", tmp_path / "run", *TINY,
                    "--order", "sequential")
        try:
            s.keys("0")
            shot = s.screenshot("labeling_window_10_classes.png")
            geometry = dict(line.split("=") for line in s.xdotool("getwindowgeometry", "--shell", s.window).split())
        finally:
            s.proc.kill()
            s.proc.communicate()
    assert int(geometry["WIDTH"]) <= 1024 and int(geometry["HEIGHT"]) <= 700, geometry  # the window fits
    # the picture's red frame is on screen whole: a square with all four sides drawn
    r, g, b = Image.open(shot).convert("RGB").split()
    dark = [band.point(lambda v: 255 * (v < 60)) for band in (g, b)]
    mask = ImageChops.multiply(r.point(lambda v: 255 * (abs(v - synthetic_images.FRAME[0]) < 30)),
                               ImageChops.multiply(*dark))
    x0, y0, x1, y1 = mask.getbbox()
    assert abs((x1 - x0) - (y1 - y0)) <= 2 and y1 - y0 >= 150, (x0, y0, x1, y1)
    for edge in ((x0, y0, x1, y0 + 1), (x0, y1 - 1, x1, y1), (x0, y0, x0 + 1, y1), (x1 - 1, y0, x1, y1)):
        assert ImageStat.Stat(mask.crop(edge)).mean[0] > 250, edge
    shown = s.events("shown")[-1]
    assert shown["box"][1] >= y1 - y0  # fitted to the canvas it really has


def test_a_class_under_half_its_fair_share_is_lopsided_after_twenty_answers_unless_chance_explains_it():
    from window_charts import lopsided
    assert lopsided([16, 4]) == [1] and lopsided([15, 4]) == [] and lopsided([10, 10]) == []
    assert lopsided([12, 12, 1]) == [2] and lopsided([18, 1, 1], min_answers=30) == []
    assert lopsided([20] + [0] * 9) == list(range(1, 10))  # every answer one class of ten
    assert lopsided([9] * 9 + [0]) == [9]                   # one class of ten never answered, in 81
    assert lopsided([10, 10, 3]) == []                      # 3 of 23 among 3 classes: chance, 12% of the time
    # balanced answers among 10 classes: a class with none is common at 20 answers, and rarely warned about
    rng = random.Random(0)
    draws = [[rng.randrange(10) for _ in range(20)] for _ in range(1000)]
    assert sum(bool(lopsided([d.count(c) for c in range(10)])) for d in draws) < 30


def test_imported_labels_are_never_shown_and_count_apart_from_the_persons_answers(display, tmp_path, pool):
    from dataset import file_sha1, list_image_files
    imported = list_image_files(pool)[:5]
    (tmp_path / "labels.csv").write_text("sha1,class\n" + "".join(f"{file_sha1(p)},bees\n" for p in imported))
    out = tmp_path / "run"
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--import-labels", tmp_path / "labels.csv")
    assert "0 answered · 0 skipped · 5 imported" in wait_for_status(s, lambda text: "imported" in text)
    s.keys("0", "0")
    assert s.events("shown")[-1]["counts"] == [2, 0]  # the person's answers; the five imported bees are apart
    s.keys("q")
    rc, stdout, stderr = s.finish()
    assert rc == 0, stderr
    assert "--import-labels" in stdout and "5 labels added" in stdout
    assert not {e["path"] for e in s.events("shown")} & set(imported)
    assert len(answers(out)) == 7


def recheck_rows(run_dir):
    with sqlite3.connect(os.path.join(run_dir, "feedback.sqlite")) as db:
        return db.execute("SELECT path, earlier, answer FROM rechecks ORDER BY id").fetchall()


def test_a_recheck_asks_again_a_changed_answer_and_its_undo_are_stored_row_by_row_and_resume_skips_it(
        display, tmp_path, pool):
    out = tmp_path / "run"
    # every answer may be asked again: the first update's doubts come back after the questions prepared ahead
    s = Session(display, tmp_path, "--images", pool, "--out", out, *TINY, "--recheck", "1", "--order", "sequential")
    s.keys("0", "0", "0", "0")
    s.wait_for("metrics")             # the first update's doubts are queued once it ends
    while s.events("shown")[-1]["earlier"] is None:
        s.keys("0")
    first = s.events("shown")[-1]
    assert first["earlier"] == 0 and first["path"] in answers(out)
    shot = s.screenshot("labeling_window_recheck.png")
    s.keys("1")                       # changed: bee
    assert recheck_rows(out) == [(first["path"], 0, 1)]
    s.keys("u")                       # taken back: the recheck is asked again, its row gone
    again = s.events("shown")[-1]
    assert (again["path"], again["earlier"]) == (first["path"], 0) and recheck_rows(out) == []
    s.keys("0")                       # confirmed this time
    s.keys("q")
    rc, _, stderr = s.finish()
    assert rc == 0, stderr
    assert recheck_rows(out) == [(first["path"], 0, 0)]
    assert answers(out)[first["path"]] == 0  # the first answer's row stays as it was
    assert ImageStat.Stat(Image.open(shot).convert("L")).stddev[0] > 10, "blank screenshot"

    resumed = Session(display, tmp_path, "--out", out, "--resume")
    for _ in range(4):
        assert resumed.events("shown")[-1]["path"] != first["path"]  # asked again once: never a third time
        resumed.keys("1")
    resumed.keys("q")
    rc, _, stderr = resumed.finish()
    assert rc == 0, stderr
    assert recheck_rows(out)[0] == (first["path"], 0, 0)
