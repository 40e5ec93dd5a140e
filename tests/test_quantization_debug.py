"""The per-layer quantization error report on real LiteRT runs."""
import keras
import numpy as np
import pytest

from tflite_ext import convert
from tflite_ext.errors import InputError
from tflite_ext.quantization import debug


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
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, layers.Dense(10, name="logits")(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=32, verbose=0)
    return model, convert.to_tflite(model, digits.x_train[:100]).flatbuffer


def test_report_names_layers_with_finite_errors(float_and_int8, digits):
    model, flatbuffer = float_and_int8
    report = debug.layer_error_report(model, flatbuffer, digits.x_test[:64])
    layers = [row["layer"] for row in report["rows"]]
    # conv1+bn1+relu1 is one fused int8 op whose output is relu1's; every int8 tensor matched.
    assert layers == ["relu1", "pool", "conv2", "gap", "logits"]
    assert report["samples"] == 64 and sorted(report["worst"]) == sorted(layers)
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
