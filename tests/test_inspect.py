"""inspect.summary on real flatbuffers: the demo-style int8 model, a float model, sine_float,
a tf.while_loop (WHILE with cond/body subgraphs) and a Conv3D."""
import json
import os

import keras
import pytest
import tensorflow as tf
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


@pytest.fixture(scope="module")
def while_model():
    """y = x*2+1 applied 3 times in a tf.while_loop: TFLite keeps it as WHILE, whose cond
    (LESS) and body (MUL, ADD) live in subgraphs 1 and 2."""
    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def repeat(x):
        _, y = tf.while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * 2.0 + 1.0),
                             [tf.constant(0), x])
        return y

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [repeat.get_concrete_function()], repeat)
    return converter.convert()


def test_control_flow_subgraphs_are_walked(while_model):
    info = inspect.summary(while_model)
    assert info["subgraphs"] == 3
    # Before walking every subgraph only WHILE was seen.
    assert info["op_counts"] == {"WHILE": 1, "LESS": 1, "MUL": 1, "ADD": 2}
    assert [(op["subgraph"], op["op"]) for op in info["operators"]] == [
        (0, "WHILE"), (1, "LESS"), (2, "ADD"), (2, "MUL"), (2, "ADD")]
    assert info["inputs"][0]["name"] == "x" and info["outputs"][0]["name"] == "Identity"
    assert "MUL#1 in subgraph 2" in info["float_ops"]
    # Five 4-byte scalars: the counter's start 0 (subgraph 0), its bound 3 (cond), and the
    # body's step 1, 1.0 and 2.0.
    consts = [(t["subgraph"], t["dtype"], t["const_bytes"]) for t in info["tensors"]
              if t["const_bytes"]]
    assert consts == [(0, "int32", 4), (1, "int32", 4), (2, "int32", 4), (2, "float32", 4),
                      (2, "float32", 4)]
    assert info["const_bytes"] == 20


def test_float_in_a_loop_body_is_a_leak(while_model):
    info = inspect.summary(while_model)
    # Even with the entry subgraph's float op and I/O allowed, the body stays float.
    leaks = inspect.float_leaks(info, ["WHILE", "x", "Identity"])
    assert leaks[:2] == ["MUL#1 in subgraph 2", "ADD#2 in subgraph 2"]
    assert "while/mul in subgraph 2" in leaks
    assert info["full_integer"] is False
    # Allowing the op types excuses every tensor they touch; the cond's float argument is
    # touched by no op, so only its name would excuse it.
    assert inspect.float_leaks(info, ["WHILE", "MUL", "ADD"]) == ["while_cond_arg1 in subgraph 1"]
    assert "float op: MUL#1 in subgraph 2 (" in inspect.render(info)


def test_conv3d_macs_use_the_tflite_filter_layout():
    inputs = keras.Input((4, 5, 6, 2))
    model = keras.Model(inputs, keras.layers.Conv3D(3, (2, 3, 4))(inputs))
    info = inspect.summary(convert.to_tflite(model, mode="float32").flatbuffer)
    [conv] = [op for op in info["operators"] if op["op"] == "CONV_3D"]
    # TFLite keeps TF's filter layout [KD, KH, KW, Cin, Cout] (CONV_2D's is [Cout, KH, KW, Cin]).
    assert info["tensors"][conv["inputs"][1]]["shape"] == [2, 3, 4, 2, 3]
    # Output 3x3x3 positions x 3 filters, each a 2*3*4*2-tap dot product.
    assert conv["macs"] == (3 * 3 * 3 * 3) * (2 * 3 * 4 * 2) == 3888
    assert info["macs"] == 3888


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
