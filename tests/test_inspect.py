"""inspect.summary on real flatbuffers: the demo-style int8 model, a float model, sine_float."""
import json
import os

import numpy as np
import pytest
import tflite_micro

from tflite_ext import convert, inspect
from tflite_ext.errors import ModelFileError

SINE = os.path.join(os.path.dirname(tflite_micro.__file__), "python", "tflite_micro",
                    "sine_float.tflite")


def test_int8_model_is_full_integer_with_exact_macs_and_bytes(tiny_int8):
    info = inspect.summary(tiny_int8.flatbuffer)
    assert info["full_integer"] is True
    assert info["float_tensors"] == [] and info["float_ops"] == []
    assert info["op_counts"] == {"CONV_2D": 1, "MAX_POOL_2D": 1, "RESHAPE": 1,
                                 "FULLY_CONNECTED": 1}
    # Conv: 8*8 outputs * 4 filters * 3*3*1 taps; Dense: 10 * 64.
    assert info["macs"] == 8 * 8 * 4 * 9 + 10 * 64
    assert info["inputs"][0]["dtype"] == "int8" and info["outputs"][0]["dtype"] == "int8"
    assert info["inputs"][0]["shape"] == [1, 8, 8, 1]
    const = {t["name"]: t for t in info["tensors"] if t["const_bytes"]}
    sizes = sorted((t["dtype"], t["const_bytes"]) for t in const.values())
    # int8 conv kernel 4x3x3x1, int32 conv bias 4, int8 dense kernel 10x64, int32 dense bias 10
    # (plus the int32 shape operand of RESHAPE).
    assert ("int8", 36) in sizes and ("int8", 640) in sizes
    assert ("int32", 16) in sizes and ("int32", 40) in sizes
    assert info["const_bytes"] == sum(t["const_bytes"] for t in info["tensors"])
    assert info["size_bytes"] == len(tiny_int8.flatbuffer)


def test_per_channel_quantization_is_reported(tiny_int8):
    info = inspect.summary(tiny_int8.flatbuffer)
    conv = next(op for op in info["operators"] if op["op"] == "CONV_2D")
    kernel = info["tensors"][conv["inputs"][1]]
    assert len(kernel["quantization"]["scale"]) == 4  # one scale per output channel
    assert kernel["quantization"]["zero_point"] == [0, 0, 0, 0]  # symmetric weights


def test_float_model_lists_every_float_op(trained_tiny):
    result = convert.to_tflite(trained_tiny, mode="float32")
    info = inspect.summary(result.flatbuffer)
    assert info["full_integer"] is False
    assert sorted(o.split("#")[0] for o in info["float_ops"]) == [
        "CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "RESHAPE"]
    assert info["macs"] == 8 * 8 * 4 * 9 + 10 * 64
    assert "full integer: no" in inspect.render(info)


def test_sine_float_from_tflite_micro_package():
    info = inspect.summary(SINE)
    assert info["op_counts"] == {"FULLY_CONNECTED": 3}
    assert info["macs"] == 1 * 16 + 16 * 16 + 16 * 1
    assert info["full_integer"] is False
    assert len(info["float_ops"]) == 3
    assert info["inputs"][0]["dtype"] == "float32" and info["inputs"][0]["shape"] == [1, 1]
    # float32 weights 16 + 256 + 16 and biases 16 + 16 + 1, four bytes each.
    assert info["const_bytes"] == 4 * (16 + 256 + 16 + 16 + 16 + 1)
    json.dumps(info)  # --json needs plain values


def test_float_leaks_respects_allowed_op_types():
    info = inspect.summary(SINE)
    assert inspect.float_leaks(info, ["FULLY_CONNECTED"]) == []
    leaks = inspect.float_leaks(info)
    assert leaks[:3] == ["FULLY_CONNECTED#0", "FULLY_CONNECTED#1", "FULLY_CONNECTED#2"]


@pytest.mark.parametrize("make, message", [
    (lambda p, good: None, "not found"),
    (lambda p, good: open(p, "wb").close(), "empty"),
    (lambda p, good: open(p, "wb").write(good[: len(good) // 2]), "truncated"),
    (lambda p, good: open(p, "wb").write(b"\xf0\xff\xff\x7f" + good[4:]), "Corrupt"),
    (lambda p, good: open(p, "wb").write(b"hello, this is not a model\n"), "Not a TFLite"),
])
def test_bad_files_get_one_line_errors(tmp_path, tiny_int8, make, message):
    path = tmp_path / "bad.tflite"
    make(path, tiny_int8.flatbuffer)
    with pytest.raises(ModelFileError, match=message) as info:
        inspect.summary(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncation_inside_weight_data_is_caught(tiny_int8):
    data = tiny_int8.flatbuffer
    with pytest.raises(ModelFileError, match="runs past|points outside|Truncated"):
        inspect.summary(data[: len(data) - 64])
