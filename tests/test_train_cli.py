"""train_rlhf.py as a user runs it: the files a run leaves, --resume, repeatability and every bad input."""
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_user_error, make_subset, metrics, run_cli, store_rows
from run_config import ConfigError, RunConfig

TINY = ["--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size", "4"]


def test_headless_run_leaves_its_files_and_resume_asks_nothing_twice(tmp_path, small_pool):
    out = tmp_path / "runs" / "demo"
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--val", small_pool, "--out", out,
                   "--epochs", "2", "--max-answers", "12", "--rm-min-answers", "8", "--policy-update", "ppo", *TINY,
                   "--batch-size", "6", "--update-epochs", "2")
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "feedback.sqlite", "checkpoint.pt", "reference.pt", "metrics.jsonl",
                 "training_data.json"):
        assert (out / name).is_file(), name
    assert os.path.realpath(tmp_path / "runs" / "latest") == str(out)
    rows = store_rows(out)
    assert len(rows) == 12 and len({r[0] for r in rows}) == 12
    lines = metrics(out)
    updates = [m for m in lines if not m.get("epoch_end")]
    for key in ("answers", "mean_reward", "agreement", "policy_loss", "approx_kl", "kl_ref", "clipfrac",
                "entropy", "rm_loss", "rm_acc", "val_acc"):
        assert key in updates[0], key
    # the reward model's rewards train the policy only while it predicts new answers better than chance
    assert all("rm_weight" in m for m in updates)
    assert all(m["rm_images"] == 0 for m in updates if m["rm_weight"] == 0)
    assert [m["epoch"] for m in lines if m.get("epoch_end")] == [1, 2]
    exported = json.loads((out / "training_data.json").read_text())
    assert len(exported["episodes"]) == 2 and len(exported["human_feedback"]) == 12
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["class_names"] == ["ants", "bees"] and ckpt["image_size"] == 16 and ckpt["epoch"] == 2
    assert ckpt["step"] == updates[-1]["update"] and ckpt["config"]["max_answers"] == 12
    assert "update" in proc.stdout and "val_acc" in proc.stdout

    # --resume with --out asks nothing again; the same --images written relative to the working folder is the
    # same run (and config.json keeps it absolute)
    relative = os.path.relpath(small_pool, tmp_path)
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--images", relative, "--epochs", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert store_rows(out) == rows
    assert metrics(out)[-2]["asked_this_run"] == 0
    assert json.loads((out / "config.json").read_text())["images"] == str(small_pool)  # still absolute

    proc = run_cli("train_rlhf.py", "--resume", "--epochs", "4", "--max-answers", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # runs/latest found from the working folder
    new_rows = store_rows(out)
    assert new_rows[:12] == rows and len(new_rows) == 16
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4

    # another folder is not the same run
    assert_user_error(run_cli("train_rlhf.py", "--resume", "--images", tmp_path, "--epochs", "5", cwd=tmp_path),
                      "--images", "differs from")


def test_same_command_twice_gives_the_same_metrics(tmp_path, small_pool):
    results = []
    for name in ("a", "b"):
        proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", tmp_path / name, "--epochs", "1",
                       "--max-answers", "12", "--seed", "7", "--feedback-noise", "0.2", "--feedback-skip", "0.1", *TINY)
        assert proc.returncode == 0, proc.stderr
        results.append([{k: v for k, v in m.items() if k != "update_s"} for m in metrics(tmp_path / name)])
        results[-1].append([r[2] for r in store_rows(tmp_path / name)])
    assert results[0] == results[1]


def test_kill_9_mid_run_loses_no_answer_and_resume_asks_none_again(tmp_path, photos):
    out = tmp_path / "run"
    pool = make_subset(tmp_path / "pool", photos, 10)
    args = [sys.executable, os.path.join(ROOT, "train_rlhf.py"), "--images", pool, "--out", str(out),
            "--epochs", "3", *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "feedback.sqlite"
    deadline = time.time() + 240
    count = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    count = conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 6:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after_kill = store_rows(out)
    assert 6 <= len(after_kill) < 16

    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "1", "--max-answers", "16")
    assert proc.returncode == 0, proc.stderr
    final = store_rows(out)
    assert final[:len(after_kill)] == after_kill
    assert len(final) == 16 and len({r[0] for r in final}) == 16
    asked = [m["asked_this_run"] for m in metrics(out)]
    assert asked[-1] == 16 - len(after_kill)


def test_missing_empty_and_default_image_folders_are_one_line_errors(tmp_path):
    assert_user_error(run_cli("train_rlhf.py", "--images", tmp_path / "nope", "--out", tmp_path / "r", *TINY),
                      "nope", "--images")
    (tmp_path / "empty" / "ants").mkdir(parents=True)
    assert_user_error(run_cli("train_rlhf.py", "--images", tmp_path / "empty", "--classes", "ants", "bees",
                              "--out", tmp_path / "r", *TINY), "empty", "holds no images")
    # no data/ folder in the working directory and no network question possible (stdin is not a tty)
    proc = run_cli("train_rlhf.py", "--feedback", "folder", "--out", tmp_path / "r2", cwd=tmp_path)
    assert_user_error(proc, "hymenoptera_data", "--images DIR")


def test_a_folder_with_no_readable_image_is_a_one_line_error_and_leaves_no_run_folder(tmp_path):
    # a new folder's files are read in the background, but the start still reads until it finds one image
    for name in ("ants/a.jpg", "ants/b.jpg", "bees/c.jpg"):
        os.makedirs(tmp_path / "p" / os.path.dirname(name), exist_ok=True)
        (tmp_path / "p" / name).write_text("not a picture")
    proc = run_cli("train_rlhf.py", "--images", tmp_path / "p", "--out", tmp_path / "run", *TINY)
    assert_user_error(proc, "no readable image", str(tmp_path / "p"))
    assert not os.path.exists(tmp_path / "run")


def test_an_image_outside_the_class_folders_stops_the_simulated_labeler_before_anything_is_written(tmp_path,
                                                                                                  small_pool):
    ant = min(os.listdir(os.path.join(small_pool, "ants")))
    shutil.copy(os.path.join(small_pool, "ants", ant), os.path.join(small_pool, "loose.jpg"))
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", tmp_path / "run", *TINY)
    assert_user_error(proc, "loose.jpg", "class folder")
    assert not os.path.exists(tmp_path / "run")


def test_unwritable_out_and_resume_without_run_are_one_line_errors(tmp_path, small_pool):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli("train_rlhf.py", "--images", small_pool, "--out", blocker / "run", *TINY),
                      "run", "--out")
    assert_user_error(run_cli("train_rlhf.py", "--resume", "--out", tmp_path / "nothing"),
                      "nothing", "holds no run")
    assert_user_error(run_cli("train_rlhf.py", "--images", small_pool, "--out", tmp_path / "w", *TINY,
                              "--weights", tmp_path / "missing.pth"), "missing.pth", "--weights")


def test_checkpoint_with_another_class_count_is_refused(tmp_path, small_pool):
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", tmp_path / "two", "--epochs", "1",
                   "--max-answers", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    before = store_rows(tmp_path / "two")
    # the checkpoint of a three-class run: three class names and a three-way head
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    ckpt["class_names"] = ["0", "1", "2"]
    for key in ("model.fc.weight", "model.fc.bias"):
        ckpt["policy"][key] = torch.cat([ckpt["policy"][key], ckpt["policy"][key][:1]])
    torch.save(ckpt, tmp_path / "two" / "checkpoint.pt")
    proc = run_cli("train_rlhf.py", "--out", tmp_path / "two", "--resume", "--epochs", "2")
    assert_user_error(proc, "checkpoint.pt", "classes")
    assert store_rows(tmp_path / "two") == before


def test_feedback_database_from_another_image_set_is_refused(tmp_path, photos):
    first = make_subset(tmp_path / "first", photos, 4)
    second = make_subset(tmp_path / "second", photos, 4, offset=20)
    proc = run_cli("train_rlhf.py", "--images", first, "--out", tmp_path / "a", "--epochs", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    before = store_rows(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "feedback.sqlite", tmp_path / "b" / "feedback.sqlite")
    proc = run_cli("train_rlhf.py", "--images", second, "--out", tmp_path / "b", "--epochs", "1", *TINY)
    assert_user_error(proc, "feedback.sqlite", "other images")
    assert store_rows(tmp_path / "b") == before


def test_help_documents_every_flag():
    proc = run_cli("train_rlhf.py", "--help")
    assert proc.returncode == 0
    for flag in ("--images", "--feedback-noise", "--max-answers", "--clip-coef", "--kl-coef", "--target-kl",
                 "--rm-min-answers", "--weights", "--finetune", "--device", "--seed", "--resume"):
        assert flag in proc.stdout


@pytest.mark.parametrize("flag, value, needle", [
    ("--image-size", "100000", "from 16 to 1024"), ("--learning-rate", "nan", "--learning-rate nan"),
    ("--update-epochs", "0", "--update-epochs 0"), ("--batch-size", "0", "--batch-size 0"),
    ("--epochs", "-1", "at least 1"), ("--max-answers", "0", "at least 1"),
    ("--feedback-noise", "1.5", "--feedback-noise 1.5"), ("--explore", "-1", "--explore -1.0"),
    ("--num-minibatches", "1000", "--num-minibatches 1000")])
def test_settings_out_of_range_are_refused_with_their_valid_range(flag, value, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        RunConfig.from_args([flag, value])


@pytest.mark.parametrize("flag, needle", [("--update-epochs", "invalid int value: 'x'"),
                                          ("--target-kl", "invalid float value: 'x'")])
def test_a_setting_that_may_be_none_names_its_type_when_the_value_is_no_number(flag, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        RunConfig.from_args([flag, "x"])
    assert exit_.value.code == 2 and f"argument {flag}: {needle}" in capsys.readouterr().err


def test_a_setting_out_of_range_is_one_line_before_anything_is_written(tmp_path, small_pool):
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", tmp_path / "r", *TINY, "--image-size", "0")
    assert_user_error(proc, "--image-size 0", "from 16 to 1024")
    assert not (tmp_path / "r").exists()


def test_a_saved_config_out_of_range_is_refused_on_resume_and_names_the_file(tmp_path, small_pool):
    out = tmp_path / "run"
    proc = run_cli("train_rlhf.py", "--images", small_pool, "--out", out, "--epochs", "1", "--max-answers", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    before = store_rows(out)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "batch_size": -3}))
    assert_user_error(run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2"), "config.json",
                      "--batch-size -3")
    (out / "config.json").write_text(json.dumps({**saved, "surprise": 1}))
    assert_user_error(run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2"), "config.json", "surprise")
    assert store_rows(out) == before


# settings added by the learning issue and after it, each with what a run did before it existed
ADDED_LATER = {"policy_update": "ppo", "policy_replay": False, "policy_ema": 0.0, "policy_ema_debias": False,
               "verdict_evidence": "hard", "reask": "later", "recheck": 0.0, "neighbour_prior": "none",
               "neighbour_targets": False}


def test_a_config_saved_before_the_newer_settings_reads_as_the_rules_that_run_had():
    for ask, batch, expected in (("label", 8, 8), ("label", None, 24), ("verdict", None, 8)):
        flat = RunConfig.from_args(["--ask", ask] + (["--batch-size", str(batch)] if batch else [])).to_flat()
        saved = {k: v for k, v in flat.items() if k not in ADDED_LATER and k != "unanswered_batch"}
        old = RunConfig.from_flat(saved).to_flat()
        assert {k: old[k] for k in ADDED_LATER} == ADDED_LATER
        assert old["unanswered_batch"] == expected  # its epoch's end trained one update's worth at a time
    new = RunConfig()  # a new run takes today's defaults, and a saved one keeps what it holds
    assert (new.ppo.policy_update, new.rm.verdict_evidence, new.unanswered_batch) == ("optimum", "posterior", 24)
    assert RunConfig.from_flat(new.to_flat()).to_flat() == new.to_flat()


def test_a_run_saved_before_the_newer_settings_resumes_with_its_own_rules_unless_told(tmp_path, digits):
    out = tmp_path / "run"
    args = ["--images", digits, "--feedback", "folder", "--image-size", "16", "--weights", "none", "--batch-size",
            "8", "--max-answers", "16", "--rm-min-answers", "8"]
    assert run_cli("train_rlhf.py", *args, "--out", out, "--epochs", "1", "--policy-update", "ppo",
                   "--policy-ema", "0").returncode == 0
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in saved.items()
                                                 if k not in ADDED_LATER and k != "unanswered_batch"}))
    before = store_rows(out)
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "2", "--max-answers", "32")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / "config.json").read_text())
    assert {k: resumed[k] for k in ADDED_LATER} == ADDED_LATER and resumed["unanswered_batch"] == 8
    later = [m for m in metrics(out) if m.get("epoch") == 2 and "policy_loss" in m]
    assert later and all("clipfrac" in m and "kl_to_optimum" not in m for m in later)  # PPO's steps, not the fit
    assert store_rows(out)[:len(before)] == before
    # a flag given on resume still wins
    proc = run_cli("train_rlhf.py", "--out", out, "--resume", "--epochs", "3", "--max-answers", "48",
                   "--policy-update", "optimum")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["policy_update"] == "optimum"
