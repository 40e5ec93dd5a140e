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


# ----------------------------------------------------------------------------- issue 12

def _softmax_head(kind, x):
    if kind == "Softmax":
        return keras.layers.Softmax()(keras.layers.Dense(4)(x))
    if kind == "Activation":
        return keras.layers.Activation("softmax")(keras.layers.Dense(4)(x))
    return keras.layers.Dense(4, activation="softmax")(x)


def qat_softmax_model(kind="Softmax"):
    """A QAT classifier with a softmax head, fit for one epoch (its ranges are trained)."""
    from tflite_ext.quantization import quantize_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    outputs = _softmax_head(kind, keras.layers.Dense(8, activation="relu")(inputs))
    qat = quantize_model(keras.Model(inputs, outputs))
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(np.random.default_rng(0).random((64, 16), "float32"), np.arange(64) % 4, epochs=1,
            verbose=0)
    return qat


@pytest.mark.parametrize("kind", ["Softmax", "Activation", "Dense"])
def test_qat_softmax_converts_to_full_int8_without_calibration_data(kind):
    qat = qat_softmax_model(kind)
    result = convert.to_tflite(qat)
    report = result.report
    assert report["full_integer"] and report["float_leaks"] == []
    assert report["op_counts"] == {"FULLY_CONNECTED": 2, "SOFTMAX": 1}
    out = report["outputs"][0]
    # TFLite's int8 softmax has a fixed output scale of 1/256 and zero point -128.
    assert (out["dtype"], out["scale"], out["zero_point"]) == ("int8", 1 / 256, -128)
    x = np.random.default_rng(1).random((32, 16), "float32")
    error = np.abs(host.predict(result.flatbuffer, x) - qat.predict(x, verbose=0)).max()
    assert error <= 3 / 256, error  # a few output steps of int8 rounding


def test_conversion_error_is_the_op_and_its_reason():
    # The int16x8 op set cannot take this int8-trained softmax: the converter's verifier refuses
    # it, and the message must carry its sentence, not the MLIR location before it.
    with pytest.raises(ConversionError) as info:
        convert.to_tflite(qat_softmax_model(), mode="int16x8")
    message = str(info.value)
    assert message == ("TFLite conversion failed: 'tfl.softmax' op failed to verify that input "
                       "and output must have same element type")


def test_op_errors_drop_mlir_locations():
    text = ('<unknown>:0: error: loc(callsite(fused["Softmax:", "f/Softmax@__inference_1"] at '
            'fused["StatefulPartitionedCall:", "S_1"])): \'tfl.softmax\' op failed to verify '
            'that input and output must have same element type\n<unknown>:0: note: '
            'loc(fused["StatefulPartitionedCall:", "S_1"]): called from\n'
            '<unknown>:0: error: loc("x"): \'tfl.softmax\' op failed to verify that input and '
            'output must have same element type\n')
    assert convert.op_errors(text) == [
        "'tfl.softmax' op failed to verify that input and output must have same element type"]
    assert convert.op_errors("error: something else") == []


@keras.saving.register_keras_serializable(package="tflite_ext_tests")
class Sin(keras.layers.Layer):
    """A float-only op (TFLite has no int8 SIN) as a layer a .keras file can hold."""

    def call(self, x):
        return keras.ops.sin(x)


def test_qat_model_with_a_float_layer_names_it_without_calibration_data():
    from tflite_ext.quantization import quantize_model

    inputs = keras.Input((8,))
    x = Sin(name="sin")(keras.layers.Dense(4)(inputs))
    qat = quantize_model(keras.Model(inputs, keras.layers.Dense(2)(x)), skip_layers=["sin"])
    # Its ranges are all there: what is missing is an int8 SIN, not calibration data.
    with pytest.raises(ConversionError, match=r"op\(s\) SIN stay float.*allow_float=\['SIN'\]"):
        convert.to_tflite(qat)
    assert convert.to_tflite(qat, allow_float=["SIN"]).report["op_counts"]["SIN"] == 1


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def test_subclassed_model_converts_once_called():
    keras.utils.set_random_seed(0)
    model = SubclassedNet()
    x = np.random.default_rng(0).random((100, 16), "float32")
    model(x[:2])
    result = convert.to_tflite(model, x)
    report = result.report
    assert report["full_integer"] and report["float_leaks"] == []
    assert report["inputs"][0]["shape"] == [1, 16] and report["outputs"][0]["shape"] == [1, 3]
    assert report["macs"] == 16 * 8 + 8 * 3
    error = np.abs(host.predict(result.flatbuffer, x[:20]) - model.predict(x[:20], verbose=0))
    assert error.max() < 0.05, error.max()  # int8 rounding of outputs in about [-2, 2]


def test_subclassed_model_never_called_is_one_line_input_error():
    with pytest.raises(InputError, match=r"never called.*model\(x\).*Received: model=net$") \
            as info:
        convert.to_tflite(SubclassedNet(name="net"), np.ones((4, 16), "float32"))
    assert "\n" not in str(info.value)


def two_input_model(b_shape=(4,)):
    """Inputs `a` and `b` (a vector or an image) each through their own layers, then added:
    each input keeps its own scale."""
    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,), name="a"), keras.Input(b_shape, name="b")
    flat_b = b
    if len(b_shape) > 1:
        conv = keras.layers.Conv2D(2, 3, padding="same")(b)
        flat_b = keras.layers.GlobalAveragePooling2D()(conv)
    out = keras.layers.Add()([keras.layers.Dense(2)(a), keras.layers.Dense(2)(flat_b)])
    return keras.Model([a, b], out)


def input_scales(report, field="scale"):
    """{input name: its scale (or another field)} of a converted model's report."""
    return {t["name"].removeprefix("serving_default_").split(":")[0]: t[field]
            for t in report["inputs"]}


def test_several_inputs_calibrate_each_input_with_its_own_data(tmp_path):
    model = two_input_model()
    rng = np.random.default_rng(0)
    xa, xb = rng.random((50, 4), "float32"), 100 * rng.random((50, 4), "float32")
    np.savez(tmp_path / "ab.npz", b=xb, a=xa)
    forms = {"list in model.inputs order": [xa, xb], "dict": {"b": xb, "a": xa},
             ".npz": str(tmp_path / "ab.npz"),
             "generator of dicts": lambda: ({"a": xa[i:i + 1], "b": xb[i:i + 1]}
                                            for i in range(50))}
    for name, data in forms.items():
        report = convert.to_tflite(model, data).report
        assert report["full_integer"], name
        scales = input_scales(report)
        # Asymmetric int8 over [0, max]: scale = max / 255.
        assert scales["a"] == pytest.approx(xa.max() / 255, rel=1e-2), (name, scales)
        assert scales["b"] == pytest.approx(xb.max() / 255, rel=1e-2), (name, scales)


def test_several_inputs_of_different_shapes(tmp_path):
    model = two_input_model(b_shape=(2, 2, 1))
    rng = np.random.default_rng(0)
    xa, xb = rng.random((30, 4), "float32"), 10 * rng.random((30, 2, 2, 1), "float32")
    for data in ([xa, xb], {"a": xa, "b": xb}):
        report = convert.to_tflite(model, data).report
        assert report["full_integer"]
        assert input_scales(report, "shape") == {"a": [1, 4], "b": [1, 2, 2, 1]}
        assert input_scales(report)["b"] == pytest.approx(xb.max() / 255, rel=1e-2)


def test_calibration_dict_keys_must_name_the_inputs(tmp_path):
    model = two_input_model()
    x = np.ones((10, 4), "float32")
    with pytest.raises(InputError, match=r"keys \['a', 'c'\] do not match the model's inputs "
                                         r"\['a', 'b'\].*Received: keys=\['a', 'c'\]$"):
        convert.to_tflite(model, {"a": x, "c": x})


def test_npz_with_more_arrays_than_inputs_is_refused(trained_tiny, digits, tmp_path):
    x = digits.x_train[:20]
    np.savez(tmp_path / "two.npz", x=x, y=x)
    name = trained_tiny.layers[0].name  # the keras.Input's name
    with pytest.raises(InputError, match=rf"keys \['x', 'y'\] do not match the model's inputs "
                                         rf"\['{name}'\]") as info:
        convert.to_tflite(trained_tiny, str(tmp_path / "two.npz"))
    assert "\n" not in str(info.value)


def test_dynamic_spatial_input_accepts_calibration_data():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(0).random((20, 16, 16, 3), "float32")
    result = convert.to_tflite(model, data)
    assert result.report["full_integer"] and result.report["float_leaks"] == []
    # The converted model keeps the spatial size dynamic: LiteRT runs it at 16x16 after a resize.
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=result.flatbuffer)
    detail = interp.get_input_details()[0]
    assert list(detail["shape_signature"]) == [1, -1, -1, 3]
    interp.resize_tensor_input(detail["index"], [1, 16, 16, 3])
    interp.allocate_tensors()
    scale, zero = detail["quantization"]
    interp.set_tensor(detail["index"], np.round(data[:1] / scale + zero).astype("int8"))
    interp.invoke()
    out = interp.get_output_details()[0]
    got = (interp.get_tensor(out["index"]).astype("float32") - out["quantization"][1]) \
        * out["quantization"][0]
    np.testing.assert_allclose(got, model.predict(data[:1], verbose=0), atol=0.02)
    with pytest.raises(InputError, match=r"does not match model input .* \(N, None, None, 3\)"):
        convert.to_tflite(model, data[..., :2])


def test_lut_path_and_save_writes_both_or_neither(tmp_path):
    from clustering_models import lut_result

    assert convert.lut_path("a/model.tflite") == "a/model.lut.tflite"
    assert convert.lut_path("model") == "model.lut.tflite"
    result = lut_result()
    (tmp_path / "taken.tflite").mkdir()  # the int8 file cannot be written over a folder
    with pytest.raises(OSError):
        result.save(str(tmp_path / "taken.tflite"))
    assert sorted(os.listdir(tmp_path)) == ["taken.tflite"]
    assert len(result.lut.flatbuffer) < len(result.flatbuffer)
    assert result.lut.report["bytes"] == len(result.lut.flatbuffer)
    assert result.lut.report["bytes_before"] == len(result.flatbuffer)
    assert result.lut.report["runtime"].startswith("TensorFlow Lite Micro only")
