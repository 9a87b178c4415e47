"""The int8 variant of inference.py's ONNX Runtime engine: the checkpoint's fp32 export with its convolutions
quantized (weights per channel, activations calibrated on images of the job), checked against fp32 on others
of it, and cached beside the fp32 export with the check's result.

    net, meta = load_int8(checkpoint) or build_int8(checkpoint, calibration_images, check_images)
    check_passed(meta)        # every probability of every check image within CHECK_TOLERANCE of fp32's
"""
import contextlib
import io
import json
import logging
import os
import tempfile

import numpy as np

import onnx_engine

CALIBRATION_IMAGES, CHECK_IMAGES = 32, 64  # a job shorter than both runs without int8: the build would not pay
CHECK_TOLERANCE = 0.02  # the largest change of any probability against fp32 that --precision auto accepts
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # instructions that add uint8 x int8 products in int32


def int8_places(checkpoint, digest):
    """Where the int8 export of this checkpoint may lie: beside the fp32 export's places, `.int8` in the name."""
    return [place[:-len(".onnx")] + ".int8.onnx" for place in onnx_engine.export_places(checkpoint, digest)]


def load_int8(checkpoint, reduce_range=None):
    """(OnnxNet, metadata with "int8_check") of the checkpoint's cached int8 export, or None where there is none.
    reduce_range True or False: only an export quantized so (one made for another kind of CPU is built again)."""
    try:
        digest = onnx_engine.checkpoint_digest(checkpoint)
    except OSError:
        return None
    for place in int8_places(checkpoint, digest):
        if os.path.isfile(place):
            try:
                session, meta = onnx_engine._session(place)
            except Exception:  # damaged or foreign: built again over it
                continue
            if isinstance(meta.get("int8_check"), dict) and (reduce_range is None or built_for(meta, reduce_range)):
                return onnx_engine.OnnxNet(session, meta["mean"], meta["std"]), meta
    return None


def job_long_enough(files):
    """Whether a job of `files` can calibrate int8 and check it in full (--precision auto weighs int8 only then)."""
    return len(files) >= CALIBRATION_IMAGES + CHECK_IMAGES


def fully_checked(meta):
    """Whether the export's check ran on CHECK_IMAGES images (an explicit int8 on a short job checks fewer)."""
    return meta["int8_check"].get("images", 0) >= CHECK_IMAGES


def check_passed(meta):
    """Whether the int8 export kept every probability of every check image within CHECK_TOLERANCE of fp32's (a
    class may then change only where fp32's two likeliest were that close: a tie either way)."""
    check = meta.get("int8_check") or {}
    return check.get("images", 0) > 0 and check.get("max_diff", 1.0) <= CHECK_TOLERANCE


def build_int8(checkpoint, calibration, check, reduce_range=False):
    """Quantize the checkpoint's cached fp32 export, calibrated on `calibration` and checked on `check` (uint8
    images, N x 3 x H x W); cache it; (OnnxNet, metadata). None where no fp32 export is on disk. reduce_range:
    7-bit weights, for a CPU without int8 dot products (reduce_range_here)."""
    digest = onnx_engine.checkpoint_digest(checkpoint)
    source = next((p for p in onnx_engine.export_places(checkpoint, digest) if os.path.isfile(p)), None)
    if source is None:
        return None
    fp32_session, meta = onnx_engine._session(source)
    fp32 = onnx_engine.OnnxNet(fp32_session, meta["mean"], meta["std"])
    # One batch: the percentile calibrator stacks what each batch gave, so batches of unequal size break it.
    proto = _quantized(source, [{fp32.input: onnx_engine.normalize(calibration, fp32.mean, fp32.std)}],
                       reduce_range)
    int8_session, _ = onnx_engine._session(_with_meta(proto, meta))
    net = onnx_engine.OnnxNet(int8_session, meta["mean"], meta["std"])
    want, got = fp32.probabilities(check), net.probabilities(check)
    meta = {**meta, "int8_reduce_range": bool(reduce_range),
            "int8_check": {"images": len(check), "same_class": int((want.argmax(1) == got.argmax(1)).sum()),
                           "max_diff": round(float(np.abs(want - got).max()), 6) if len(check) else 1.0}}
    data = _with_meta(proto, meta)
    places = int8_places(checkpoint, digest)
    for place in places:
        if onnx_engine._save(place, data):
            break
    onnx_engine._remove_older_exports(places[0], ".int8.onnx")
    return net, meta  # the session the check ran: the saved file differs only in the check's metadata


def built_for(meta, reduce_range):
    """Whether a cached int8 export was quantized as this machine needs (exports made before the choice existed
    took 8-bit weights)."""
    return bool(meta.get("int8_reduce_range", False)) == bool(reduce_range)


def reduce_range_here(cpu_flags):
    """Whether int8 weights should take 7 bits on a CPU with these /proc/cpuinfo flags. Without int8 dot
    products ONNX Runtime adds pairs of uint8 x int8 products in int16, where two 8-bit weights can overflow and
    saturate; 7 bits cannot. Unknown flags (another architecture or OS) take 7 bits too: the safe side."""
    return not any(flag in cpu_flags for flag in INT8_DOT_FLAGS)


def _quantized(source, inputs, reduce_range=False):
    """The ONNX model in file `source` with its convolutions quantized, calibrated on `inputs` (session feeds)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(inputs)

        def get_next(self):
            return next(self.feeds, None)

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice is for its developers, not our users
    try:
        with tempfile.TemporaryDirectory(prefix="rlhf-int8-") as tmp:
            prepared, quantized = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "int8.onnx")
            # Constant folding first, so the folded BatchNorm's biases are initializers the quantizer can read.
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            # Convolutions only: the head's few multiplies cost nothing, and quantized they move the probabilities
            # most. Ranges from the 0.001-99.999 percentiles rather than the extremes: one odd calibration image
            # then does not stretch a range and coarsen every other image's steps. The calibrator prints progress.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(prepared, quantized, Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=reduce_range,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["Conv"], calibrate_method=CalibrationMethod.Percentile)
            return onnx.load(quantized)
    finally:
        logging.getLogger().setLevel(quiet)


def _with_meta(proto, meta):
    for entry in proto.metadata_props:
        if entry.key == onnx_engine.META_KEY:
            entry.value = json.dumps(meta)
            break
    else:
        entry = proto.metadata_props.add()
        entry.key, entry.value = onnx_engine.META_KEY, json.dumps(meta)
    return proto.SerializeToString()


def describe(meta):
    """The check's result in words, for the CLI's output."""
    check = meta["int8_check"]
    return (f"int8 against fp32 on {check['images']} check images: the same class on {check['same_class']}, "
            f"probabilities within {check['max_diff']:.4f}")
