"""inference.py --precision int8: ONNX Runtime on the quantized export, calibrated and checked against fp32 on the
job's images, cached per checkpoint; --precision auto takes it only where it passed and measured faster.

    python -m pytest -q tests/test_int8_engine.py
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, run_cli
from test_onnx_backend import save_checkpoint

sys.path.insert(0, ROOT)

import batch_classifier
import int8_engine
import onnx_engine

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

JOB = int8_engine.CALIBRATION_IMAGES + int8_engine.CHECK_IMAGES


@pytest.fixture
def files(photos):
    """The photo-like pictures: enough for a calibration and a check."""
    found = batch_classifier.list_inputs([str(photos)])
    assert len(found) >= JOB
    return found


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_int8_export_is_checked_against_fp32_and_kept(tmp_path, files):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    fp32, _ = batch_classifier.load_served(model, "onnxruntime")  # the fp32 export it quantizes, on disk
    calibration, check = batch_classifier.spread_sample(files, 32, 32, 64)
    net, meta = int8_engine.build_int8(model, calibration, check)
    # the check is what fp32 and int8 say about the check images
    want, got = fp32.net.probabilities(check), net.probabilities(check)
    assert meta["int8_check"] == {"images": 64, "same_class": int((want.argmax(1) == got.argmax(1)).sum()),
                                  "max_diff": round(float(np.abs(want - got).max()), 6)}
    assert 0 < meta["int8_check"]["max_diff"] < 0.1  # quantized, so not fp32's to the bit, but close
    assert int8_engine.check_passed(meta) == (meta["int8_check"]["max_diff"] <= int8_engine.CHECK_TOLERANCE)
    assert meta["class_names"] == ["ants", "bees"] and meta["image_size"] == 32
    # kept beside the checkpoint, read back as it was made
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.endswith(".int8.onnx"))
    again, kept = int8_engine.load_int8(model)
    assert kept == meta
    np.testing.assert_array_equal(again.probabilities(check), net.probabilities(check))


def test_a_changed_checkpoint_gets_its_own_int8_export(tmp_path, files):
    model = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(model, 0)
    batch_classifier.load_served(str(model), "onnxruntime")
    int8_engine.build_int8(str(model), *batch_classifier.spread_sample(files, 32, 32, 64))
    first = [n for n in os.listdir(model.parent) if n.endswith(".int8.onnx")]
    save_checkpoint(model, 1)  # the run went on: new weights in the same file
    assert int8_engine.load_int8(str(model)) is None
    batch_classifier.load_served(str(model), "onnxruntime")
    int8_engine.build_int8(str(model), *batch_classifier.spread_sample(files, 32, 32, 64))
    now = [n for n in os.listdir(model.parent) if n.endswith(".int8.onnx")]
    assert len(first) == len(now) == 1 and first != now  # the older one removed


def test_precision_int8_in_the_cli_stays_close_to_fp32(tmp_path, files):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    fp32 = run_cli("inference.py", *files, "--model", model, "--precision", "fp32", "--backend", "onnxruntime",
                   "--csv", str(tmp_path / "fp32.csv"), cwd=tmp_path)
    int8 = run_cli("inference.py", *files, "--model", model, "--precision", "int8", "--csv",
                   str(tmp_path / "int8.csv"), cwd=tmp_path)
    assert fp32.returncode == 0 and int8.returncode == 0, int8.stderr
    assert "onnxruntime int8" in int8.stdout and "onnxruntime fp32" in fp32.stdout
    a, b = read_csv(tmp_path / "fp32.csv"), read_csv(tmp_path / "int8.csv")
    assert list(a) == list(b) == files
    diff = max(abs(float(a[p][k]) - float(b[p][k])) for p in a for k in a[p] if k.startswith("prob_"))
    assert 0 < diff < 0.1


def seed_machine_choice(cache, image_size, choice):
    """The per-machine measurements as a machine where ONNX Runtime won, and int8 against fp32 went `choice` (None:
    not measured yet)."""
    key = batch_classifier.engine_key(image_size)
    known = {key: {"choice": "onnxruntime", "seconds": {}}}
    cache.mkdir(parents=True, exist_ok=True)
    if choice:
        known[f"int8 | {key}"] = {"choice": choice, "seconds": {}}
    (cache / batch_classifier.PRECISION_FILE).write_text(json.dumps(known))


def test_precision_auto_takes_int8_only_where_it_passed_and_won(tmp_path, files, monkeypatch, engine_cache):
    cache = engine_cache
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    seed_machine_choice(cache, 32, "int8")
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 1.0)  # any check passes
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[1:] == ("onnxruntime", "int8")
    assert batch_classifier.load_for_flags(model, "onnxruntime", "auto", "cpu", files)[2] == "int8"
    # an explicit fp32, or a job too short to calibrate and check, runs fp32
    assert batch_classifier.load_for_flags(model, "auto", "fp32", "cpu", files)[1:] == ("onnxruntime", "fp32")
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files[:JOB - 1])[2] == "fp32"
    # a check that failed for this checkpoint: fp32, whatever the machine prefers
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 0.0)
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[1:] == ("onnxruntime", "fp32")
    # fp32 measured faster on this machine: the int8 export is not even looked for
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 1.0)
    seed_machine_choice(cache, 32, "fp32")
    monkeypatch.setattr(int8_engine, "load_int8", lambda path, *how: pytest.fail("looked for the int8 export"))
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[2] == "fp32"


def test_precision_auto_measures_int8_against_fp32_once(tmp_path, files, monkeypatch, engine_cache):
    cache = engine_cache
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    seed_machine_choice(cache, 32, None)
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 1.0)
    clf, engine, precision = batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)
    key = f"int8 | {batch_classifier.engine_key(32)}"
    entry = json.loads((cache / batch_classifier.PRECISION_FILE).read_text())[key]
    assert set(entry["seconds"]) == {"int8", "fp32"}
    assert entry["choice"] == min(entry["seconds"], key=entry["seconds"].get)
    assert precision == entry["choice"]
    monkeypatch.setattr(batch_classifier, "measure_onnx", lambda clf: pytest.fail("measured again"))
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[2] == precision


def test_int8_refuses_what_it_cannot_run(tmp_path, files):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    out = tmp_path / "out.csv"
    assert_user_error(run_cli("inference.py", files[0], "--model", model, "--precision", "int8", "--backend", "torch",
                              "--csv", out, cwd=tmp_path), "--precision int8", "--backend torch")
    assert_user_error(run_cli("inference.py", "--model", model, "--precision", "int8", cwd=tmp_path),
                      "--precision int8", "window")
    assert not out.exists()


def test_calibration_and_check_images_span_a_folder_sorted_by_class(files, monkeypatch):
    decoded = []
    monkeypatch.setattr(batch_classifier, "load_batch", lambda paths, size: decoded.append(paths) or (
        np.zeros((len(paths), 3, size, size), np.uint8), [None] * len(paths)))
    calibration, check = batch_classifier.spread_sample(files, 16, 32, 64)
    assert (len(calibration), len(check)) == (len(decoded[0]), len(decoded[1])) == (32, 64)
    assert len(set(decoded[0] + decoded[1])) == 96
    for part in decoded:  # calibration, then check: both classes in each
        assert {os.path.basename(os.path.dirname(p)) for p in part} == {"ants", "bees"}
    # a short job: every file once, a third of them to calibrate
    decoded.clear()
    calibration, check = batch_classifier.spread_sample(files[:10], 16, 32, 64)
    assert (len(calibration), len(check)) == (4, 6) and sorted(decoded[0] + decoded[1]) == sorted(files[:10])


def test_without_a_folder_for_the_exports_int8_is_refused_and_auto_runs_fp32(tmp_path, files, monkeypatch, capsys,
                                                                             engine_cache):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    monkeypatch.setattr(onnx_engine, "_save", lambda place, data: False)  # no folder can be written
    with pytest.raises(batch_classifier.InferenceError, match="--precision int8: .*pass --precision fp32"):
        batch_classifier.load_for_flags(model, "auto", "int8", "cpu", files)
    seed_machine_choice(engine_cache, 32, "int8")
    capsys.readouterr()
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[1:] == ("onnxruntime", "fp32")
    assert capsys.readouterr().err == ""


def test_an_int8_export_checked_on_a_short_job_is_made_again_for_a_long_one(tmp_path, files, monkeypatch,
                                                                            engine_cache):
    cache = engine_cache
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    assert batch_classifier.load_for_flags(model, "auto", "int8", "cpu", files[:10])[2] == "int8"
    assert int8_engine.load_int8(model)[1]["int8_check"]["images"] < int8_engine.CHECK_IMAGES
    seed_machine_choice(cache, 32, "int8")
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 1.0)
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[2] == "int8"
    assert int8_engine.load_int8(model)[1]["int8_check"]["images"] == int8_engine.CHECK_IMAGES


def test_seven_bit_weights_only_where_the_cpu_lacks_int8_dot_products():
    assert int8_engine.reduce_range_here({"avx2", "fma"})  # pairs of products added in int16: 8 bits overflow
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not int8_engine.reduce_range_here({"avx2", flag})


def int8_weights(path):
    """The quantized convolution weights of an int8 export, as integers."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]


@pytest.mark.parametrize("dot_products", [False, True])
def test_an_int8_export_is_made_for_the_cpu_it_runs_on(tmp_path, files, monkeypatch, engine_cache, dot_products):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    flags = {"avx2", "avx512_vnni"} if dot_products else {"avx2"}
    monkeypatch.setattr(batch_classifier, "cpu_info", lambda: ("Test CPU", flags))
    assert batch_classifier.load_for_flags(model, "auto", "int8", "cpu", files)[2] == "int8"
    _, meta = int8_engine.load_int8(model)
    assert meta["int8_reduce_range"] == (not dot_products)
    assert 0 < meta["int8_check"]["max_diff"] < 0.1
    (export,) = [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".int8.onnx")]
    widest = max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights(str(export)))
    assert widest <= 64 if not dot_products else widest > 64  # 7 bits where products would saturate
    # the same run folder on the other kind of CPU: quantized again for it, in place of the first
    other = {"avx2"} if dot_products else {"avx2", "avx512_vnni"}
    monkeypatch.setattr(batch_classifier, "cpu_info", lambda: ("Test CPU", other))
    assert batch_classifier.load_for_flags(model, "auto", "int8", "cpu", files)[2] == "int8"
    assert int8_engine.load_int8(model)[1]["int8_reduce_range"] == dot_products
    assert len([p for p in (tmp_path / "run").iterdir() if p.name.endswith(".int8.onnx")]) == 1


def seed_torch_won(cache, image_size, precision):
    """The per-machine measurements as a machine where torch at `precision` beat ONNX Runtime fp32."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / batch_classifier.PRECISION_FILE).write_text(json.dumps(
        {batch_classifier.engine_key(image_size): {"choice": precision, "seconds": {}}}))


@pytest.mark.parametrize("int8_seconds, wanted", [(0.5, ("onnxruntime", "int8")), (2.0, ("torch", "bf16"))])
def test_precision_auto_weighs_int8_against_torch_where_torch_won(tmp_path, files, monkeypatch, engine_cache,
                                                                   int8_seconds, wanted):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    seed_torch_won(engine_cache, 32, "bf16")  # torch bf16 beat ONNX Runtime fp32 here, as on some CPUs
    monkeypatch.setattr(int8_engine, "CHECK_TOLERANCE", 1.0)
    calls = []
    monkeypatch.setattr(batch_classifier, "measure_onnx", lambda clf: calls.append("int8") or int8_seconds)
    monkeypatch.setattr(batch_classifier, "measure_precision", lambda clf, device="cpu", kinds=("fp32", "bf16"):
                        calls.append(kinds) or {k: 1.0 for k in kinds})
    clf, engine, precision = batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)
    assert (engine, precision) == wanted and calls == ["int8", ("bf16",)]  # int8 against torch bf16, not fp32
    assert isinstance(clf.net, onnx_engine.OnnxNet) == (engine == "onnxruntime")
    key = f"int8 | {batch_classifier.engine_key(32)}"
    kept = json.loads((engine_cache / batch_classifier.PRECISION_FILE).read_text())[key]
    assert kept == {"choice": wanted[1], "seconds": {"int8": int8_seconds, "bf16": 1.0}}
    # measured once; where int8 won, the next job takes it without loading the model into torch
    load_classifier, load_int8 = batch_classifier.load_classifier, int8_engine.load_int8
    if engine == "onnxruntime":
        monkeypatch.setattr(batch_classifier, "load_classifier", lambda spec: pytest.fail("loaded into torch"))
    else:
        monkeypatch.setattr(int8_engine, "load_int8", lambda path, *how: pytest.fail("looked for the int8 export"))
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files)[1:] == wanted
    assert len(calls) == 2
    # a job too short to calibrate and check runs what torch won with
    monkeypatch.setattr(batch_classifier, "load_classifier", load_classifier)
    monkeypatch.setattr(int8_engine, "load_int8", load_int8)
    assert batch_classifier.load_for_flags(model, "auto", "auto", "cpu", files[:JOB - 1])[1:] == ("torch", "bf16")


def test_default_flags_run_a_cached_int8_export_without_importing_torch(tmp_path, files, engine_cache):
    model = str(save_checkpoint(tmp_path / "run" / "checkpoint.pt", 0))
    first = run_cli("inference.py", *files, "--model", model, "--precision", "int8", "--csv",
                    str(tmp_path / "first.csv"), cwd=tmp_path)  # builds and checks the int8 export on this job
    assert first.returncode == 0, first.stderr
    assert int8_engine.check_passed(int8_engine.load_int8(model)[1]), "the check failed: no auto int8 to test"
    seed_torch_won(engine_cache, 32, "fp32")
    known = json.loads((engine_cache / batch_classifier.PRECISION_FILE).read_text())
    known[f"int8 | {batch_classifier.engine_key(32)}"] = {"choice": "int8", "seconds": {}}  # int8 won here
    (engine_cache / batch_classifier.PRECISION_FILE).write_text(json.dumps(known))
    code = ("import sys, inference; code = inference.main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    out = tmp_path / "again.csv"
    done = subprocess.run([sys.executable, "-c", code, *files, "--model", model, "--csv", str(out), "--workers", "2"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout and "onnxruntime int8" in done.stdout
    assert out.read_text() == (tmp_path / "first.csv").read_text()
