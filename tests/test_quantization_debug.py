"""The per-layer quantization error report on real LiteRT runs."""
import keras
import numpy as np
import pytest

from tflite_ext import convert
from tflite_ext.errors import InputError
from tflite_ext.quantization import debug


def _trained_and_int8(inputs, features, digits):
    """inputs -> features -> gap -> logits after 2 epochs on digits, and its PTQ int8 flatbuffer."""
    x = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=32, verbose=0)
    return model, convert.to_tflite(model, digits.x_train[:100]).flatbuffer


@pytest.fixture(scope="module")
def float_and_int8(digits):
    """A small conv-BN-ReLU CNN (2 epochs) and its PTQ full-int8 flatbuffer."""
    keras.utils.set_random_seed(4)
    layers = keras.layers
    i = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(i)
    x = layers.ReLU(name="relu1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    return _trained_and_int8(i, x, digits)


def test_report_names_layers_with_finite_errors(float_and_int8, digits):
    model, flatbuffer = float_and_int8
    report = debug.layer_error_report(model, flatbuffer, digits.x_test[:64])
    layers = [row["layer"] for row in report["rows"]]
    # conv1+bn1+relu1 is one fused int8 op whose output is relu1's; every int8 tensor matched.
    assert layers == ["relu1", "pool", "conv2", "gap", "logits"]
    assert report["samples"] == 64 and sorted(report["worst"]) == sorted(layers)
    assert report["unmatched"] == []
    for row in report["rows"]:
        assert np.isfinite(row["rmse"]) and row["scale"] > 0
        # int8 error: well under a few quantization steps, under 5% of the float signal.
        assert row["rmse_steps"] < 3 and row["relative_rmse"] < 0.05
    assert report["rows"][0]["op"] == "CONV_2D" and report["rows"][-1]["op"] == "FULLY_CONNECTED"
    table = debug.render_markdown(report, top=3)
    assert table.count("\n| ") == 4  # header + 3 rows
    assert f"| {report['worst'][0]} |" in table


def test_report_rejects_bad_data(float_and_int8):
    model, flatbuffer = float_and_int8
    with pytest.raises(InputError, match=r"input shape \(8, 8, 1\)\. Received: "
                                         r"data.shape=\(4, 8, 8, 3\)$"):
        debug.layer_error_report(model, flatbuffer, np.zeros((4, 8, 8, 3)))
    bad = np.zeros((4, 8, 8, 1))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"must be a finite float array"):
        debug.layer_error_report(model, flatbuffer, bad)


@pytest.fixture(scope="module")
def separable_and_int8(digits):
    """conv1 (8 channels) -> SeparableConv2D(16) -> conv2 (8): TFLite splits the separable conv
    into a DEPTHWISE_CONV_2D, whose 8x8x8 output no Keras layer has (it has conv1's and
    conv2's shape), and a 1x1 CONV_2D that makes sep's output."""
    keras.utils.set_random_seed(4)
    layers = keras.layers
    i = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(i)
    x = layers.SeparableConv2D(16, 3, padding="same", activation="relu", name="sep")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    return _trained_and_int8(i, x, digits)


def test_depthwise_intermediate_is_not_matched_to_a_same_shaped_layer(separable_and_int8, digits):
    model, flatbuffer = separable_and_int8
    report = debug.layer_error_report(model, flatbuffer, digits.x_test[:64])
    # Each layer once, with the op that makes its output; the depthwise half is unmatched
    # (it used to be compared with conv2's output: 24 "steps" of error it does not have).
    assert [(row["layer"], row["op"]) for row in report["rows"]] == [
        ("conv1", "CONV_2D"), ("sep", "CONV_2D"), ("conv2", "CONV_2D"), ("gap", "MEAN"),
        ("logits", "FULLY_CONNECTED")]
    [depthwise] = report["unmatched"]
    assert "sep" in depthwise and "depthwise" in depthwise
    for row in report["rows"]:
        assert row["rmse_steps"] < 3 and row["relative_rmse"] < 0.05
    # sep is charged with what it adds to conv1's error, not with the error against a
    # layer it does not compute.
    added = {row["layer"]: row["added_error"] for row in report["rows"]}
    relative = {row["layer"]: row["relative_rmse"] for row in report["rows"]}
    assert added["sep"] == pytest.approx(relative["sep"] - relative["conv1"])
    assert sorted(report["worst"]) == ["conv1", "conv2", "gap", "logits", "sep"]
    assert debug.render_markdown(report).endswith(
        f"\n\nNot compared (1 integer tensors no Keras layer outputs, e.g. a SeparableConv2D's "
        f"depthwise half): `{depthwise}`")


def test_outputs_are_matched_by_signature_not_position(digits):
    # Two same-shaped heads; TFLite lists alpha's tensor first, the signature says zeta is
    # output_0. Output tensors carry no layer name ("StatefulPartitionedCall_1:0").
    keras.utils.set_random_seed(1)
    i = keras.Input((8, 8, 1))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Conv2D(4, 3, name="conv")(i))
    model = keras.Model(i, [keras.layers.Dense(4, name="zeta")(x),
                            keras.layers.Dense(4, name="alpha")(x)])
    flatbuffer = convert.to_tflite(model, digits.x_train[:100]).flatbuffer
    report = debug.layer_error_report(model, flatbuffer, digits.x_test[:32])
    tensor_of = {row["layer"]: row["tensor"] for row in report["rows"]}
    assert tensor_of["zeta"] == "StatefulPartitionedCall_1:0"
    assert tensor_of["alpha"] == "StatefulPartitionedCall_1:1"
    assert sorted(tensor_of) == ["alpha", "conv", "gap", "zeta"] and report["unmatched"] == []
    assert all(row["rmse_steps"] < 3 for row in report["rows"])


def test_flatten_model_at_batch_1_is_run_sample_by_sample(trained_tiny, tiny_int8, digits):
    # Its RESHAPE has the fixed shape [1, 64]: the interpreter cannot take a batch of 50.
    report = debug.layer_error_report(trained_tiny, tiny_int8.flatbuffer, digits.x_test[:50])
    assert [(row["layer"], row["op"]) for row in report["rows"]] == [
        (layer.name, op) for layer, op in zip(trained_tiny.layers[1:], [
            "CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"])]
    assert report["samples"] == 50
    assert all(row["rmse_steps"] < 3 for row in report["rows"])
