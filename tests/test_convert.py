"""convert.to_tflite with the real TFLite converter, verified through the flatbuffer."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_no_partial_files, keras_top1
from tflite_ext import convert, inspect
from tflite_ext.bench import host
from tflite_ext.errors import ConversionError, InputError, ModelFileError


def test_int8_agrees_with_float_keras(trained_tiny, tiny_int8, digits):
    report = tiny_int8.report
    assert report["full_integer"] and report["float_leaks"] == []
    assert report["mode"] == "int8" and report["io_dtype"] == "int8"
    top1 = np.argmax(host.predict(tiny_int8.flatbuffer, digits.x_test), axis=-1)
    agreement = np.mean(top1 == keras_top1(trained_tiny, digits.x_test))
    assert agreement >= 0.97, agreement  # int8 rounding flips only borderline samples


def test_representative_data_forms_calibrate_identically(trained_tiny, tiny_int8, digits,
                                                         tmp_path):
    x = digits.x_train[:200]
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", image=x)
    forms = {
        "generator": lambda: ([s[None]] for s in x),
        "dataset": tf.data.Dataset.from_tensor_slices((x, digits.y_train[:200])).batch(1),
        "list of samples": list(x),
        ".npy": str(tmp_path / "x.npy"),
        ".npz": str(tmp_path / "x.npz"),
    }
    for name, data in forms.items():
        flatbuffer = convert.to_tflite(trained_tiny, data).flatbuffer
        assert flatbuffer == tiny_int8.flatbuffer, name


@pytest.mark.parametrize("kwargs, io, full_integer, const_dtype", [
    ({"io_dtype": "uint8"}, "uint8", True, "int8"),
    ({"io_dtype": "float32"}, "float32", False, "int8"),
    ({"mode": "int16x8"}, "int16", True, "int8"),
    ({"mode": "float16"}, "float32", False, "float16"),
    # Dynamic range leaves tensors under 1,024 elements in float; the 640-weight kernel is one.
    ({"mode": "dynamic"}, "float32", False, "float32"),
    ({"mode": "float32"}, "float32", False, "float32"),
])
def test_modes_and_io_types(trained_tiny, digits, kwargs, io, full_integer, const_dtype):
    result = convert.to_tflite(trained_tiny, digits.x_train[:100], **kwargs)
    info = result.report
    assert info["inputs"][0]["dtype"] == io and info["outputs"][0]["dtype"] == io
    assert info["full_integer"] is full_integer
    assert info["float_leaks"] == []
    kernel = max(info["tensors"], key=lambda t: t["const_bytes"])
    assert kernel["dtype"] == const_dtype and kernel["shape"] == [10, 64]


def test_keras_file_and_savedmodel_paths(trained_tiny, tiny_int8, digits, tmp_path):
    trained_tiny.save(tmp_path / "m.keras")
    from_file = convert.to_tflite(str(tmp_path / "m.keras"), digits.x_train[:200])
    # Same weights and calibration: the int8 model computes exactly the same outputs.
    np.testing.assert_array_equal(host.predict(from_file.flatbuffer, digits.x_test[:50]),
                                  host.predict(tiny_int8.flatbuffer, digits.x_test[:50]))
    trained_tiny.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    from_saved = convert.to_tflite(str(tmp_path / "saved"), digits.x_train[:200])
    assert from_saved.report["full_integer"]
    assert from_saved.report["macs"] == tiny_int8.report["macs"]


def test_save_writes_atomically(tiny_int8, tmp_path):
    path = tiny_int8.save(tmp_path / "out" / "model.tflite")
    assert open(path, "rb").read() == tiny_int8.flatbuffer
    assert_no_partial_files(tmp_path / "out")


def _with_nan(x):
    x = x.copy()
    x[3, 2, 2, 0] = np.nan
    return x


def _with_inf(x):
    x = x.copy()
    x[0, 0, 0, 0] = np.inf
    return x


@pytest.mark.parametrize("make_data, message", [
    (lambda x: x[:, :4], r"shape \(20, 4, 8, 1\) does not match .* \(N, 8, 8, 1\)"),
    (lambda x: (x * 16).astype("int32"), "dtype must be floating.*int32"),
    (lambda x: (x * 16).astype("uint8"), "dtype must be floating.*uint8"),
    (_with_nan, "1 NaN/inf value.*sample 3"),
    (_with_inf, "1 NaN/inf value.*sample 0"),
    (lambda x: x[:0], "empty"),
    (lambda x: None, "needs representative_data"),
])
def test_bad_representative_data(trained_tiny, digits, make_data, message):
    with pytest.raises(InputError, match=message) as info:
        convert.to_tflite(trained_tiny, make_data(digits.x_train[:20]))
    assert "\n" not in str(info.value)


def test_input_count_mismatch():
    a, b = keras.Input((4,)), keras.Input((3,))
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(InputError, match="1 input array.*the model has 2 input"):
        convert.to_tflite(model, np.ones((10, 4), "float32"))
    two = convert.to_tflite(model, [np.ones((10, 4), "float32"), np.ones((10, 3), "float32")])
    assert two.report["full_integer"] and len(two.report["inputs"]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "int4"}, "mode must be one of.*Received: mode='int4'"),
    ({"io_dtype": "int16"}, "io_dtype for mode=int8 must be one of int8, uint8, float32"),
    ({"mode": "float16", "io_dtype": "int8"}, "io_dtype for mode=float16"),
])
def test_bad_options(trained_tiny, digits, kwargs, message):
    with pytest.raises(InputError, match=message):
        convert.to_tflite(trained_tiny, digits.x_train[:20], **kwargs)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist.*nope.keras"):
        convert.to_tflite(str(tmp_path / "nope.keras"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelFileError, match="not a SavedModel"):
        convert.to_tflite(str(tmp_path / "folder"))
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="Expected a .keras file"):
        convert.to_tflite(str(tmp_path / "weights.h5"))
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="Cannot load Keras model"):
        convert.to_tflite(str(tmp_path / "broken.keras"))


def _model_with(fn):
    inputs = keras.Input((8,))
    x = keras.layers.Lambda(fn)(keras.layers.Dense(8)(inputs))
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_graph_that_cannot_be_full_integer_is_refused_then_allowed():
    model, x = _model_with(keras.ops.sin), np.random.default_rng(0).random((20, 8), "float32")
    with pytest.raises(ConversionError, match=r"op\(s\) SIN stay float.*allow_float=\['SIN'\]"):
        convert.to_tflite(model, x)
    allowed = convert.to_tflite(model, x, allow_float=["SIN"])
    assert allowed.report["op_counts"]["SIN"] == 1
    assert allowed.report["float_leaks"] == [] and not allowed.report["full_integer"]


def test_op_without_any_tflite_kernel_names_the_op():
    with pytest.raises(ConversionError, match="no builtin kernel for TF op.*Atan"):
        convert.to_tflite(_model_with(keras.ops.arctan), np.ones((4, 8), "float32"))


def test_inspect_agrees_with_conversion_report(tiny_int8):
    info = inspect.summary(tiny_int8.flatbuffer)
    assert {k: tiny_int8.report[k] for k in info} == info


def test_more_bad_inputs_are_one_line_errors(trained_tiny, digits, tmp_path):
    with pytest.raises(InputError, match="representative_data must be an array.*Received: int"):
        convert.to_tflite(trained_tiny, 42)
    with pytest.raises(InputError, match="num_calibration_samples must be an integer >= 1"):
        convert.to_tflite(trained_tiny, digits.x_train[:20], num_calibration_samples=0)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError, match="Cannot load SavedModel"):
        convert.to_tflite(str(tmp_path / "saved"))


def test_saved_files_get_ordinary_permissions(tiny_int8, tmp_path):
    old = os.umask(0o022)
    try:
        path = tiny_int8.save(tmp_path / "m.tflite")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
