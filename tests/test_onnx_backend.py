"""inference.py --backend onnxruntime: the same probabilities as torch, the export cached per checkpoint content,
the fallback to torch, and --precision auto read from the per-machine measurement.

    python -m pytest -q tests/test_onnx_backend.py
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error, run_cli

sys.path.insert(0, ROOT)

import batch_classifier
import inference
import onnx_engine
from dataset import load_image, normalize
from models import PolicyModel

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def save_checkpoint(path, seed):
    """A tiny-input checkpoint of a random-init policy, as train_rlhf.py writes one."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": 1, "policy": PolicyModel(2).state_dict(), "class_names": ["ants", "bees"],
                "image_size": 32, "normalization": {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.2, 0.22]},
                "step": seed}, path)
    return path


@pytest.fixture
def cache(engine_cache):
    """The test's own per-machine cache (conftest's), never the user's home."""
    return engine_cache


@pytest.fixture
def pictures(photos):
    """Six photo-like pictures of both classes, of several sizes and shapes."""
    return [os.path.join(photos, cls, f"{cls[:-1]}_{i:03d}.jpg") for cls in ("ants", "bees") for i in range(3)]


def exports(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".onnx"))


def probabilities(clf, files):
    return np.array([list(r["probabilities"].values()) for r in batch_classifier.classify_files(clf, files, 4, 0)])


def test_onnxruntime_gives_torch_fp32_probabilities(tmp_path, pictures):
    model = save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0)
    on_torch = batch_classifier.load_classifier(str(model))
    on_ort, engine = batch_classifier.load_served(str(model), "onnxruntime")
    assert engine == "onnxruntime" and isinstance(on_ort.net, onnx_engine.OnnxNet)
    assert on_ort._replace(net=None) == on_torch._replace(net=None)  # classes, size, normalisation, name, step
    np.testing.assert_allclose(probabilities(on_ort, pictures), probabilities(on_torch, pictures), rtol=0, atol=1e-4)
    # the numpy normalisation is the torch one, to the bit
    images = torch.stack([load_image(f, 32) for f in pictures])
    assert np.array_equal(onnx_engine.normalize(images.numpy(), on_ort.mean, on_ort.std),
                          normalize(images, on_ort.mean, on_ort.std).numpy())
    # ONNX Runtime runs fp32 whatever --precision auto would pick for torch
    assert batch_classifier.load_for_flags(str(model), "onnxruntime", "auto")[1:] == ("onnxruntime", "fp32")


def test_export_is_kept_beside_the_checkpoint_and_made_again_when_it_changes(tmp_path, pictures, monkeypatch):
    model = save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0)
    first = probabilities(batch_classifier.load_served(str(tmp_path / "run"))[0], pictures)
    made = exports(tmp_path / "run")
    assert len(made) == 1 and made[0].startswith("checkpoint.pt.")

    def no_export(*args):
        raise AssertionError("exported again although the export is cached")
    with monkeypatch.context() as m:
        m.setattr(onnx_engine, "export_policy", no_export)
        m.setattr(batch_classifier, "load_classifier", no_export)  # nor is the checkpoint read by torch
        clf, engine = batch_classifier.load_served(str(tmp_path / "run"))
    assert engine == "onnxruntime" and (clf.name, clf.step) == ("run", 0)
    assert np.array_equal(probabilities(clf, pictures), first)

    save_checkpoint(model, 1)  # training wrote a newer checkpoint over it
    clf, engine = batch_classifier.load_served(str(model))
    newer = exports(tmp_path / "run")
    assert engine == "onnxruntime" and clf.step == 1
    assert len(newer) == 1 and newer != made  # a new export, the old one gone
    assert not np.allclose(probabilities(clf, pictures), first, atol=1e-4)


def test_unwritable_checkpoint_folder_puts_the_export_in_the_cache(tmp_path, cache):
    model = save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0)
    beside, in_cache = onnx_engine.export_places(str(model), onnx_engine.checkpoint_digest(str(model)))
    os.mkdir(beside)  # its place taken by a folder: the write fails as in a read-only folder (the tests run as root)
    clf, engine = batch_classifier.load_served(str(model))
    assert engine == "onnxruntime" and os.path.isfile(in_cache) and in_cache.startswith(str(cache))
    with open(in_cache, "rb") as f:
        kept = f.read()
    assert batch_classifier.load_served(str(model))[1] == "onnxruntime"
    with open(in_cache, "rb") as f:
        assert f.read() == kept  # read from the cache, not exported again


def test_cli_backends_agree_and_without_onnxruntime_auto_warns_and_onnxruntime_fails(tmp_path, photos, cache,
                                                                                     monkeypatch, capsys):
    model = save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0)
    batch_classifier.load_served(str(model))  # the export, made here once (the CLI would make the same)
    stub = tmp_path / "stub" / "onnxruntime"  # an onnxruntime that cannot be imported, as where it is missing
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named onnxruntime', name='onnxruntime')\n")
    missing = {onnx_engine.CACHE_ENV: str(cache), "PYTHONPATH": str(tmp_path / "stub")}
    args = [photos, "--model", model, "--precision", "fp32", "--csv", None, "--workers", "0"]
    classes = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / f"{engine}.csv"
        args[-3] = out
        if engine == "torch":  # without ONNX Runtime: a process of its own, where the stub is what it imports
            res = run_cli("inference.py", *args, cwd=tmp_path, env=missing)
            assert res.returncode == 0, res.stderr
            stdout = res.stdout
            # --backend auto without ONNX Runtime: one warning line, then torch
            assert res.stderr.splitlines() == ["warning: ONNX Runtime is not installed (onnxruntime): pip install "
                                               "onnxruntime onnx (requirements.txt); classifying with torch instead"]
        else:  # the CLI's main() in this process, which has ONNX Runtime
            monkeypatch.chdir(tmp_path)
            assert inference.main([str(a) for a in args]) == 0
            stdout = capsys.readouterr().out
        assert f"images/s, {engine} fp32, model run" in stdout
        with open(out, newline="") as f:
            classes[engine] = [row[:2] for row in csv.reader(f)]
    assert len(classes["torch"]) > 100 and classes["torch"] == classes["onnxruntime"]
    res = run_cli("inference.py", photos, "--model", model, "--backend", "onnxruntime", cwd=tmp_path, env=missing)
    assert_user_error(res, "--backend onnxruntime", "pip install onnxruntime", "--backend torch")


def test_failed_export_auto_warns_and_uses_torch_onnxruntime_fails(tmp_path, monkeypatch, capsys):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator\nsecond line")
    monkeypatch.setattr(torch.onnx, "export", broken)
    clf, engine = batch_classifier.load_served(model, "auto")
    assert engine == "torch" and isinstance(clf.net, torch.nn.Module)
    assert capsys.readouterr().err == ("warning: the ONNX export failed (RuntimeError: Unsupported operator); "
                                       "classifying with torch instead\n")
    with pytest.raises(batch_classifier.InferenceError, match="export failed .*; or pass --backend torch"):
        batch_classifier.load_served(model, "onnxruntime")
    assert not exports(tmp_path / "run")


def test_bad_flag_combinations_name_the_fix(tmp_path):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    with pytest.raises(batch_classifier.InferenceError, match="--precision bf16 needs --backend torch"):
        batch_classifier.load_for_flags(model, "onnxruntime", "bf16")
    with pytest.raises(batch_classifier.InferenceError, match="runs on the CPU: pass --device cpu"):
        batch_classifier.load_for_flags(model, "onnxruntime", "fp32", "cuda")
    # bf16 asked for: auto leaves ONNX Runtime (fp32 only) for torch
    assert batch_classifier.load_for_flags(model, "auto", "bf16")[1:] == ("torch", "bf16")


@pytest.mark.parametrize("measured", ["fp32", "bf16"])
def test_precision_auto_follows_the_cached_measurement(tmp_path, cache, measured):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    cache.mkdir()
    (cache / batch_classifier.PRECISION_FILE).write_text(json.dumps(
        {batch_classifier.precision_key(32): {"choice": measured}, "another machine | torch 0 | 32 px": {}}))
    if not any(f in batch_classifier.cpu_info()[1] for f in batch_classifier.BF16_FLAGS):
        measured = "fp32"  # without bf16 instructions nothing is measured: emulated bf16 is never faster
    assert batch_classifier.load_for_flags(model, "torch", "auto")[1:] == ("torch", measured)


def test_precision_auto_measures_once_and_keeps_the_result(tmp_path, cache, monkeypatch):
    clf = batch_classifier.load_classifier(str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0)))
    seconds = batch_classifier.measure_precision(clf)  # the real measurement runs and times both
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    monkeypatch.setattr(batch_classifier, "cpu_info", lambda: ("Test CPU", {"avx512_bf16"}))
    calls = []
    monkeypatch.setattr(batch_classifier, "measure_precision",
                        lambda clf, device: calls.append(device) or {"fp32": 2.0, "bf16": 1.0})
    assert batch_classifier.pick_precision("auto", clf) == "bf16"
    assert batch_classifier.pick_precision("auto", clf) == "bf16" and calls == ["cpu"]  # measured once
    kept = json.loads((cache / batch_classifier.PRECISION_FILE).read_text())
    # torch's version read without importing it: the installed package's, less the local build label
    assert batch_classifier.torch_version() == torch.__version__.split("+")[0]
    assert list(kept) == [f"Test CPU | torch {batch_classifier.torch_version()} | 32 px"]
    assert kept[list(kept)[0]]["choice"] == "bf16"


def test_default_flags_take_the_engine_measured_faster_here_once(tmp_path, cache, monkeypatch):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    # the real measurement: every engine timed, the fastest kept per machine
    clf, engine, precision = batch_classifier.load_for_flags(model, "auto", "auto")
    saved = json.loads((cache / batch_classifier.PRECISION_FILE).read_text())
    key = batch_classifier.engine_key(32)
    seconds = saved[key]["seconds"]
    assert {"onnxruntime", "fp32"} <= set(seconds) and saved[key]["choice"] == min(seconds, key=seconds.get)
    assert (engine, precision) == (("onnxruntime", "fp32") if saved[key]["choice"] == "onnxruntime"
                                   else ("torch", saved[key]["choice"]))
    # torch measured faster: taken, and the measurement is not run again
    (cache / batch_classifier.PRECISION_FILE).unlink()
    calls = []
    monkeypatch.setattr(batch_classifier, "measure_onnx", lambda clf: calls.append("onnx") or 2.0)
    monkeypatch.setattr(batch_classifier, "measure_precision",
                        lambda clf, device="cpu", kinds=("fp32", "bf16"): calls.append("torch") or {
                            k: {"fp32": 1.0, "bf16": 3.0}[k] for k in kinds})
    load_export = onnx_engine.load_export
    monkeypatch.setattr(onnx_engine, "load_export", lambda path: calls.append("export") or load_export(path))
    for _ in range(2):
        clf, engine, precision = batch_classifier.load_for_flags(model, "auto", "auto")
        assert (engine, precision) == ("torch", "fp32") and not isinstance(clf.net, onnx_engine.OnnxNet)
    assert calls == ["export", "onnx", "torch"]  # once torch has won here, no export is opened to find out
    # an explicit choice is never overruled by the measurement
    assert batch_classifier.load_for_flags(model, "onnxruntime", "auto")[1:] == ("onnxruntime", "fp32")
    assert batch_classifier.load_for_flags(model, "auto", "fp32")[1:] == ("onnxruntime", "fp32")


def test_a_cached_export_classifies_without_importing_torch(tmp_path, cache, pictures):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    first = run_cli("inference.py", *pictures, "--model", model, "--backend", "onnxruntime", "--csv",
                    str(tmp_path / "first.csv"), cwd=tmp_path)  # makes the export (torch reads the checkpoint)
    assert first.returncode == 0, first.stderr
    # ONNX Runtime measured faster here, as on the CPUs where it is
    cache.mkdir(exist_ok=True)
    (cache / batch_classifier.PRECISION_FILE).write_text(json.dumps(
        {batch_classifier.engine_key(32): {"choice": "onnxruntime"}}))
    code = ("import sys, inference; code = inference.main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    for flags in (["--backend", "onnxruntime"], []):  # explicit, and the default flags
        out = tmp_path / f"again{len(flags)}.csv"
        done = subprocess.run([sys.executable, "-c", code, *pictures, "--model", model, "--csv", str(out), *flags,
                               "--workers", "2"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert "no torch" in done.stdout and "onnxruntime fp32" in done.stdout
        assert out.read_text() == (tmp_path / "first.csv").read_text()  # the same rows, the same probabilities
