"""inspect.summary on real flatbuffers: the demo-style int8 model, a float model, sine_float,
a tf.while_loop (WHILE with cond/body subgraphs), a Conv3D, and the int8 models its warnings
are about (a standalone RELU, float I/O, a float op inside an int8 graph)."""
import json
import os

import keras
import pytest
import tensorflow as tf
import tflite_micro

from tflite_ext import cli, convert, inspect
from tflite_ext.errors import ModelFileError
from tflite_ext.quantization import quantize_model

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
    # int8 I/O, the ReLU fused into the conv: nothing to warn about.
    assert info["warnings"] == []
    assert [op["fused_activation"] for op in info["operators"]] == ["RELU", "NONE", None, "NONE"]
    assert "warnings: none" in inspect.render(info)


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
    assert info["warnings"] == []  # a float model: no int8 runtime to slow down


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


class Floor(keras.layers.Layer):
    """No int8 kernel in TFLite: an int8 conversion keeps it float only through allow_float."""

    def call(self, x):
        return keras.ops.floor(x)


def _conv_model(*middle):
    """Conv(8) -> middle layers -> Flatten -> Dense(10) on 8x8x1."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    for layer in middle:
        x = layer(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(keras.layers.Flatten()(x)))


@pytest.mark.parametrize("second, op, advice", [
    (keras.layers.ReLU, "RELU", "it repeats the RELU that CONV_2D#0 already applies: remove the "
                                "extra activation layer"),
    (lambda name: keras.layers.ReLU(6.0, name=name), "RELU6",
     "it follows the RELU that CONV_2D#0 already applies: give that layer the one activation "
     "both amount to, and remove this one"),
])
def test_standalone_int8_relu_is_warned_with_its_cause(tmp_path, capsys, second, op, advice):
    # QAT puts a range between the two ReLUs: the first fuses into the conv, the second stays
    # an op of its own, which XNNPACK leaves out of its int8 partition.
    qat = quantize_model(_conv_model(keras.layers.ReLU(name="relu_a"), second(name="relu_b")))
    result = convert.to_tflite(qat)
    info = inspect.summary(result.flatbuffer)
    assert [(o["op"], o["fused_activation"]) for o in info["operators"]] == [
        ("CONV_2D", "RELU"), (op, None), ("RESHAPE", None), ("FULLY_CONNECTED", "NONE")]
    [warning] = info["warnings"]
    assert warning.startswith(f"{op}#1 ('")
    assert "relu_b" in warning.split("'")[1]  # the output tensor names the Keras layer
    assert warning.endswith(f"'): standalone int8 {op}, which splits the XNNPACK int8 "
                            f"partition; {advice}")
    assert f"  warning: {warning}" in inspect.render(info).splitlines()
    path = result.save(str(tmp_path / "relu.tflite"))
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "warnings: 1\n" in out and f"  warning: {warning}\n" in out
    assert cli.main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning]


def test_relu_whose_input_has_another_reader(digits):
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.Concatenate()([keras.layers.ReLU()(conv), conv])
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))
    [warning] = inspect.summary(convert.to_tflite(model, digits.x_train[:50]).flatbuffer)[
        "warnings"]
    assert warning.startswith("RELU#1 (") and warning.endswith(
        "standalone int8 RELU, which splits the XNNPACK int8 partition; CONV_2D#0's output is "
        "also read by CONCATENATION#2, so the converter cannot fuse it: feed them the activated "
        "tensor if the model allows")


def test_float_io_around_int8_is_warned_as_io(digits):
    result = convert.to_tflite(_conv_model(keras.layers.ReLU()), digits.x_train[:50],
                               io_dtype="float32")
    info = inspect.summary(result.flatbuffer)
    assert [op["op"] for op in info["operators"]] == [
        "QUANTIZE", "CONV_2D", "RESHAPE", "FULLY_CONNECTED", "DEQUANTIZE"]
    x, y = info["inputs"][0], info["outputs"][0]
    quantized_x = info["tensors"][info["operators"][0]["outputs"][0]]["quantization"]
    int8_y = info["tensors"][info["operators"][-1]["inputs"][0]]["quantization"]
    assert quantized_x["scale"][0] == pytest.approx(1 / 255) and \
        quantized_x["zero_point"][0] == -128  # the digits pixels span [0, 1]
    zero = int8_y["zero_point"][0]
    assert info["warnings"] == [
        f"input '{x['name']}' is float32 and QUANTIZE#0 turns it into int8 on every call: "
        f"convert with io_dtype='int8' and feed int8 (scale=0.00392157, zero_point=-128)",
        f"output '{y['name']}' is float32, made from int8 by DEQUANTIZE#4 on every call: convert "
        f"with io_dtype='int8' and dequantize on the host ((q {'-' if zero >= 0 else '+'} "
        f"{abs(zero)}) * {int8_y['scale'][0]:.6g})"]


@pytest.mark.parametrize("io_dtype", ["int8", "float32"])
def test_float_op_inside_int8_graph_is_warned(digits, io_dtype):
    model = _conv_model(keras.layers.ReLU(), Floor(name="floor"),
                        keras.layers.Conv2D(4, 3, padding="same"))
    result = convert.to_tflite(model, digits.x_train[:50], allow_float=["FLOOR"],
                               io_dtype=io_dtype)
    info = inspect.summary(result.flatbuffer)
    ops = [op["op"] for op in info["operators"]]
    first = 1 if io_dtype == "float32" else 0  # a QUANTIZE of the float input comes first
    assert ops[first:first + 5] == ["CONV_2D", "DEQUANTIZE", "FLOOR", "QUANTIZE", "CONV_2D"]
    floor = info["operators"][first + 2]
    floor_out = info["tensors"][floor["outputs"][0]]["name"]
    assert "floor" in floor_out
    island = (f"DEQUANTIZE#{first + 1} ... QUANTIZE#{first + 3} inside the graph: "
              f"FLOOR#{first + 2} ('{floor_out}') runs in float between them (int8 to float and "
              f"back on every call): replace the layer(s) behind FLOOR with ones that have int8 "
              f"kernels")
    if io_dtype == "int8":
        assert info["warnings"] == [island]
    else:  # the I/O bridges are named as I/O, not as float islands inside the graph
        assert len(info["warnings"]) == 3 and info["warnings"][2] == island
        assert info["warnings"][0].startswith(f"input '{info['inputs'][0]['name']}' is float32")
        assert info["warnings"][1].startswith(f"output '{info['outputs'][0]['name']}' is float32")


def test_lut_compressed_tensors_bits_and_entropy_estimate():
    from clustering_models import lut_result

    result = lut_result()
    assert inspect.summary(result.flatbuffer)["compressed"] == []
    info = inspect.summary(result.lut.flatbuffer)
    assert info["full_integer"] and info["op_counts"]["TFLM_DECODE"] == 2
    found = {t["name"].split("/")[1]: t for t in info["compressed"]}
    conv2, logits = found["quant_conv2_1"], found["quant_logits_1"]
    # conv2: 1,152 weights, 2-bit indices (288 bytes), 16 per-channel tables of 4 values.
    assert (conv2["bits"], conv2["axis"], conv2["tables"], conv2["table_values"]) == (2, 0, 16, 4)
    assert (conv2["elements"], conv2["encoded_bytes"], conv2["ancillary_bytes"]) == (1152, 288,
                                                                                      16 + 64)
    assert conv2["bits_per_weight"] == pytest.approx(8 * (288 + 80) / 1152)
    # logits: per tensor, 3-bit indices into one table of 8 values.
    assert (logits["bits"], logits["axis"], logits["tables"], logits["elements"],
            logits["encoded_bytes"], logits["ancillary_bytes"]) == (3, None, 1, 2560, 960, 24)
    for t in (conv2, logits):
        assert 0 < t["index_entropy_bits"] <= t["bits"]
        assert t["huffman_estimate_bytes"] <= t["encoded_bytes"] + t["ancillary_bytes"]
        assert t["decode_ops"] == 1 and t["shape"] in ([16, 3, 3, 8], [10, 256])
    text = inspect.render(info)
    assert "TFLite Micro LUT-compressed tensors: 2" in text and "LiteRT has no kernel" in text
    assert "2-bit per channel on axis 0, 16 tables of 4 values: 1,152 weights in 368 bytes " \
           "(2.56 bits/weight)" in text
    assert "(estimate; no TFLM runtime decodes it)" in text
