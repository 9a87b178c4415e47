"""torchrun with 2 processes (gloo, CPU): the same results as one process, rank 0 alone writes, a lost
process stops the job, and one person's window is refused."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, assert_user_error, make_subset, metrics, run_cli, store_rows

# One thread each: two processes share this machine's cores; --standalone picks a free port.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("DISPLAY", None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4",
        "--rm-min-answers", "4"]


def torchrun(script, *args, timeout=300, cwd=ROOT):
    return subprocess.run([*TORCHRUN, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=ENV, check=False,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_ppo_update_and_reward_model_step_on_two_processes_equal_one_process(tmp_path):
    worker = os.path.join(ROOT, "tests", "ddp_learner_step.py")
    one = subprocess.run([sys.executable, worker, tmp_path / "one.pt"], env=ENV, capture_output=True, text=True,
                         timeout=300, check=False)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, worker, tmp_path / "two.pt"], env=ENV, capture_output=True, text=True,
                         timeout=300, check=False)
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for part in ("policy", "reward_model"):
        assert a[part].keys() == b[part].keys()
        worst = max((a[part][k].double() - b[part][k].double()).abs().max().item() for k in a[part])
        moved = max((a[part][k].double()).abs().max().item() for k in a[part] if k.endswith("weight"))
        assert worst < 1e-9 and moved > 0, (part, worst)  # parameters and BatchNorm statistics alike
        for key, value in a[part + "_stats"].items():
            assert abs(value - b[part + "_stats"][key]) < 1e-9, (part, key)


def test_inference_csv_from_two_processes_is_the_single_process_csv(tmp_path, photos):
    pool = make_subset(tmp_path / "pool", photos, 9)
    (tmp_path / "pool" / "ants" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    torch.manual_seed(0)
    from models import PolicyModel
    torch.save({"format_version": 1, "policy": PolicyModel(2).state_dict(), "class_names": ["ants", "bees"],
                "image_size": 32, "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "step": 1}, tmp_path / "model.pt")
    args = [pool, "--model", tmp_path / "model.pt", "--batch-size", "4", "--workers", "0", "--precision", "fp32"]
    one = run_cli("inference.py", *args, "--csv", tmp_path / "one.csv", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun("inference.py", *args, "--csv", tmp_path / "two.csv")
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    with open(tmp_path / "two.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 18
    # the unreadable file is reported once, as one process reports it, and written by nobody
    assert two.stderr.count("skipped ") == 1 and "zz_broken.jpg" in two.stderr
    assert "18 of 19 images classified" in two.stdout and "2 processes" in two.stdout


def test_two_process_headless_run_leaves_a_run_that_one_process_resumes(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 8, classes=["0", "1"])
    out = tmp_path / "run"
    proc = torchrun("train_rlhf.py", "--images", pool, "--val", pool, "--out", out, "--epochs", "2",
                    "--max-answers", "12", "--seed", "3", *TINY, "--batch-size", "6")
    assert proc.returncode == 0, proc.stderr
    assert "2 processes" in proc.stdout
    rows = store_rows(out)
    assert len(rows) == 12 and len({r[0] for r in rows}) == 12  # each answer stored once, by rank 0
    lines = metrics(out)
    assert [m["epoch"] for m in lines if m.get("epoch_end")] == [1, 2]
    # the reward model was fitted and scored on both processes (its weight is the same one process computes)
    updates = [m for m in lines if not m.get("epoch_end")]
    assert all("rm_weight" in m for m in updates) and all("rm_loss" in m for m in updates if m["human_images"])
    updates = [m["update"] for m in lines if not m.get("epoch_end")]
    assert len(updates) == len(set(updates))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == lines[-1]["update"]
    assert not any(k.startswith("module.") for k in ckpt["policy"])  # loads without torchrun
    # one set of run files, the two processes' shared caches included: one hash table, one decoded cache per image set
    decoded = sorted(n for n in os.listdir(out) if n.startswith("decoded-") and n.endswith(".u8"))
    assert [n.split("-")[1] for n in decoded] == ["pool", "val"]  # the pool's and --val's
    assert sorted(os.listdir(out)) == sorted([".lock", "checkpoint.pt", "config.json", "feedback.sqlite",
                                              "metrics.jsonl", "reference.pt", "training_data.json", "hashes.sqlite",
                                              *decoded]
                                             + [n for n in os.listdir(out) if n.startswith("feedback.sqlite-")])

    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "3", "--max-answers", "14")
    assert proc.returncode == 0, proc.stderr
    after = store_rows(out)
    assert after[:12] == rows and len(after) == 14
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3

    proc = torchrun("train_rlhf.py", "--out", out, "--resume", "--epochs", "4", "--max-answers", "16")
    assert proc.returncode == 0, proc.stderr  # and back to 2 processes
    final = store_rows(out)
    assert final[:14] == after and len(final) == 16 and len({r[0] for r in final}) == 16
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4


def _rank_pid(parent, rank):
    """The pid of a torchrun worker by its RANK, found among the launcher's descendants."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get(b"RANK") == str(rank).encode() and env.get(b"TORCHELASTIC_RUN_ID") and ppid == parent:
            return int(entry)
    return None


def test_killed_process_stops_the_job_and_the_store_keeps_every_answer(tmp_path, digits):
    pool = make_subset(tmp_path / "pool", digits, 8, classes=["0", "1"])
    out = tmp_path / "run"
    launcher = subprocess.Popen([*TORCHRUN, os.path.join(ROOT, "train_rlhf.py"), "--images", pool, "--out", out,
                                 "--epochs", "20", *TINY], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline, updates = time.time() + 240, 0
        while time.time() < deadline and launcher.poll() is None and updates < 3:
            if (out / "metrics.jsonl").exists():
                updates = len(metrics(out))
            time.sleep(0.1)
        assert launcher.poll() is None and updates >= 3, "the run ended or stalled before it could be killed"
        victim = _rank_pid(launcher.pid, 1)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-2000:]  # torchrun names the process that died
    assert "error: process 0 of the torchrun job stopped" in stderr and "--resume" in stderr, stderr[-2000:]
    rows = store_rows(out)
    done = metrics(out)[-1]["answers"]
    assert len(rows) >= done >= 12  # every answer counted by the last update is committed

    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    after = store_rows(out)
    assert after[:len(rows)] == rows and len({r[0] for r in after}) == len(after) == 16


def test_labeling_window_and_inference_window_under_torchrun_are_refused(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # as torchrun sets them
    proc = run_cli("train_rlhf.py", "--feedback", "gui", "--out", tmp_path / "r", env=env)
    assert_user_error(proc, "--feedback gui", "torchrun", "--feedback folder")
    assert not (tmp_path / "r").exists()
    proc = run_cli("inference.py", env=env)
    assert_user_error(proc, "window", "torchrun")
