"""QAT for Keras 3: wrappers the Keras way, full-int8 conversion without calibration data,
BN folding, freezing, pruning composition and error messages. Tiny models, real converter."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from keras import layers

from tflite_ext import convert, inspect
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.quantization import (ActivationQuantizer, FreezeQuantization, QuantizeWrapper,
                                     quantize_model)

_INT_TYPES = {"int8", "int32"}  # activations/weights int8, biases int32


def qat_to_tflite(model):
    """The converter settings of the issue: DEFAULT optimizations, int8 I/O, NO calibration."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def tflite_logits(flatbuffer, x):
    """Runs the int8 model sample by sample with LiteRT; returns dequantized outputs."""
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
    results = []
    for sample in x:
        q = np.clip(np.round(sample[None] / in_scale + in_zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q)
        interpreter.invoke()
        results.append((interpreter.get_tensor(out["index"])[0].astype(np.float32) - out_zero)
                       * out_scale)
    return np.stack(results)


def check_layer_keras_way(layer, input_shape, tmp_path, expected_weights):
    """Build, call, weight count, .keras round-trip, one fit step: the Keras-way check."""
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, layer(inputs))
    assert len(layer.weights) == expected_weights
    x = np.random.default_rng(0).random((8, *input_shape), dtype=np.float32)
    y = model(x)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))
    model.compile("adam", "mse")
    model.fit(x, np.zeros_like(keras.ops.convert_to_numpy(y)), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    return model


@pytest.mark.parametrize("make_layer, input_shape, weights", [
    # conv kernel+bias, BN gamma/beta/mean/var, bn_observing
    (lambda: QuantizeWrapper(layers.Conv2D(4, 3), batch_norm=layers.BatchNormalization()),
     (6, 6, 2), 7),
    (lambda: QuantizeWrapper(layers.DepthwiseConv2D(3, depth_multiplier=2)), (6, 6, 2), 3),
    # separable: depthwise, pointwise, bias, bn_observing, 4 for the intermediate quantizer
    (lambda: QuantizeWrapper(layers.SeparableConv2D(4, 3)), (6, 6, 2), 8),
    (lambda: QuantizeWrapper(layers.Conv1D(4, 3, padding="causal")), (6, 2), 3),
    # Dense kernel+bias, bn_observing, 4 for the logits quantizer in front of softmax
    (lambda: QuantizeWrapper(layers.Dense(3, activation="softmax")), (5,), 7),
    (lambda: QuantizeWrapper(layers.BatchNormalization()), (4, 4, 3), 5),
    (lambda: ActivationQuantizer(), (5,), 4),
])
def test_layers_the_keras_way(make_layer, input_shape, weights, tmp_path):
    check_layer_keras_way(make_layer(), input_shape, tmp_path, weights)


def mixed_model():
    """Every supported layer type once, in 8x8x3: a small but awkward graph."""
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same")(i)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    a = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    a = layers.BatchNormalization()(a)
    a = layers.Activation("relu")(a)
    b = layers.SeparableConv2D(16, 3, padding="same")(x)
    b = layers.BatchNormalization()(b)
    s = layers.ReLU()(layers.Add()([a, b]))
    c = layers.Concatenate()([s, a])
    c = layers.ZeroPadding2D()(c)
    c = layers.AveragePooling2D(2)(c)
    c = layers.UpSampling2D()(c)
    c = layers.MaxPooling2D()(c)
    c = layers.BatchNormalization()(c)  # not after a conv: an int8 1x1 depthwise
    c = layers.Dropout(0.2)(c)
    r = layers.Reshape((25, 32))(c)
    r = layers.Conv1D(8, 3, padding="causal", activation="relu")(r)
    f = layers.Flatten()(r)
    g = layers.GlobalAveragePooling2D()(c)
    o = layers.Dense(10)(layers.Concatenate()([f, g]))
    return keras.Model(i, layers.Softmax()(o))


def test_qat_model_converts_to_full_int8_without_representative_data():
    keras.utils.set_random_seed(1)
    model = mixed_model()
    qat = quantize_model(model)
    qat.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(1).random((64, 8, 8, 3), dtype=np.float32)
    qat.fit(x, np.arange(64) % 10, epochs=1, batch_size=16, verbose=0)
    info = inspect.summary(qat_to_tflite(qat))
    assert info["full_integer"], info["float_tensors"]
    assert {t["dtype"] for t in info["tensors"]} <= _INT_TYPES
    assert info["op_counts"]["DEPTHWISE_CONV_2D"] == 3  # depthwise, separable's, lone BN
    assert info["op_counts"]["CONV_2D"] == 3 and "MUL" not in info["op_counts"]
    # The input scale is exactly the one the input quantizer trained.
    q = qat.get_layer(qat.layers[1].name)
    lo, hi = float(q.range_min.numpy()), float(q.range_max.numpy())
    assert info["inputs"][0]["dtype"] == "int8"
    assert info["inputs"][0]["scale"] == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert info["outputs"][0]["scale"] == pytest.approx(1 / 256)  # int8 softmax


def test_sequential_model_converts():
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, activation="relu"),
                              layers.Dense(4), layers.Softmax()])
    qat = quantize_model(model)
    assert isinstance(qat.get_layer("quant_" + model.layers[0].name), QuantizeWrapper)
    assert inspect.summary(qat_to_tflite(qat))["full_integer"]


@pytest.fixture(scope="module")
def qat_digits(digits):
    """A tiny conv-BN-ReLU digits model: 3 float epochs, then 1 QAT epoch, 300 samples."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(i)))
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(i, layers.Dense(10)(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(digits.x_train, digits.y_train, epochs=4, batch_size=32, verbose=0)
    qat = quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-3), loss)
    qat.fit(digits.x_train[:300], digits.y_train[:300], epochs=1, batch_size=32, verbose=0)
    return model, qat


def test_tflite_agrees_with_keras_qat_model(qat_digits, digits):
    _, qat = qat_digits
    flatbuffer = qat_to_tflite(qat)
    assert inspect.summary(flatbuffer)["full_integer"]
    x = digits.x_test[:200]
    keras_top1 = qat.predict(x, verbose=0).argmax(-1)
    tflite_top1 = tflite_logits(flatbuffer, x).argmax(-1)
    # Same fake-quant grid on both sides; only rounding order differs: >= 97% agreement.
    assert np.mean(keras_top1 == tflite_top1) >= 0.97
    assert np.mean(tflite_top1 == digits.y_test[:200]) >= 0.5  # it learned something


def test_batch_norm_folding_matches_conv_then_bn():
    keras.utils.set_random_seed(2)
    conv, bn = layers.Conv2D(6, 3, strides=2, padding="same"), layers.BatchNormalization()
    i = keras.Input((9, 9, 3))
    float_model = keras.Model(i, bn(conv(i)))
    rng = np.random.default_rng(2)
    bn.set_weights([rng.uniform(0.5, 2, 6), rng.normal(size=6), rng.normal(size=6),
                    rng.uniform(0.1, 3, 6)])
    qat = quantize_model(float_model)
    wrapper = qat.get_layer("quant_" + conv.name)
    assert wrapper.batch_norm is not None and len(qat.layers) == 4  # input, quant, conv, act
    (kernel,), bias = wrapper.folded_weights()
    x = rng.random((4, 9, 9, 3), dtype=np.float32)
    folded = keras.ops.conv(x, kernel, strides=2, padding="same") + bias
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded),
                               float_model.predict(x, verbose=0), atol=1e-5)


def _trainable_copy(qat_digits, digits):
    """A fresh, compiled copy of the shared QAT model (the fixture stays untouched), 64 inputs
    with zero targets, its first activation quantizer and its first folded BatchNormalization."""
    qat = keras.models.clone_model(qat_digits[1])
    qat.set_weights(qat_digits[1].get_weights())
    qat.compile(keras.optimizers.Adam(1e-3), "mse")
    x, y = digits.x_train[:64], np.zeros((64, 10), np.float32)
    quantizer = next(layer for layer in qat.layers if isinstance(layer, ActivationQuantizer)
                     and layer.name.endswith("_act"))
    bn = next(layer for layer in qat.layers if isinstance(layer, QuantizeWrapper)
              and layer.batch_norm is not None).batch_norm
    return qat, x, y, quantizer, bn


def test_freeze_callback_stops_ranges_and_bn_statistics(qat_digits, digits):
    qat, x, y, quantizer, bn = _trainable_copy(qat_digits, digits)
    before = (float(quantizer.range_max.numpy()), bn.moving_mean.numpy().copy())
    qat.fit(x * 3, y, epochs=1, batch_size=32, verbose=0)  # 2 steps with a wider range
    moved = (float(quantizer.range_max.numpy()), bn.moving_mean.numpy().copy())
    assert moved[0] != before[0] and not np.array_equal(moved[1], before[1])
    callback = FreezeQuantization(freeze_after_step=1)
    qat.fit(x * 10, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
    after_one = (float(quantizer.range_max.numpy()), bn.moving_mean.numpy().copy())
    qat.fit(x * 50, y, epochs=2, batch_size=32, verbose=0, callbacks=[callback])
    assert float(quantizer.range_max.numpy()) == after_one[0]
    np.testing.assert_array_equal(bn.moving_mean.numpy(), after_one[1])


def test_two_freeze_callbacks_each_freeze_only_their_part(qat_digits, digits):
    """BN statistics frozen from the start, ranges after one step: the second callback must
    not turn BN statistics back on (nor the first turn ranges back on)."""
    qat, x, y, quantizer, bn = _trainable_copy(qat_digits, digits)
    mean_before = bn.moving_mean.numpy().copy()
    bn_first = FreezeQuantization(0, freeze_ranges=False)
    ranges_later = FreezeQuantization(1, freeze_batch_norm=False)
    qat.fit(x * 10, y, epochs=1, batch_size=32, verbose=0, callbacks=[bn_first, ranges_later])
    range_after = float(quantizer.range_max.numpy())
    qat.fit(x * 50, y, epochs=2, batch_size=32, verbose=0, callbacks=[bn_first, ranges_later])
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean_before)
    assert float(quantizer.range_max.numpy()) == range_after


def test_qat_model_keras_round_trip(qat_digits, digits, tmp_path):
    _, qat = qat_digits
    path = os.path.join(tmp_path, "qat.keras")
    qat.save(path)
    loaded = keras.models.load_model(path)
    x = digits.x_test[:32]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in qat.layers]


def test_float_model_is_not_modified(qat_digits, digits):
    model, qat = qat_digits
    assert not any(isinstance(layer, QuantizeWrapper) for layer in model.layers)
    assert qat.layers[2].layer is not model.layers[1]


def test_unsupported_layer_lists_layers_and_skip_argument():
    i = keras.Input((8, 4))
    x = layers.LayerNormalization(name="norm")(i)
    x = layers.Dense(4, activation="elu", name="fc")(x)  # int8 ELU does not exist in TFLite
    model = keras.Model(i, layers.Dense(2, name="out")(x))
    message = (r"^quantize_model cannot quantize 2 layer\(s\): 'norm' \(LayerNormalization\), "
               r"'fc' \(Dense with activation=elu\)\. Leave them in float with "
               r"quantize_model\(model, skip_layers=\['norm', 'fc'\]\)")
    with pytest.raises(UnsupportedLayerError, match=message) as info:
        quantize_model(model)
    assert "\n" not in str(info.value)
    qat = quantize_model(model, skip_layers=["norm", "fc"])  # the advice works
    assert isinstance(qat.get_layer("quant_out"), QuantizeWrapper)
    assert isinstance(qat.get_layer("norm"), layers.LayerNormalization)


def test_bad_arguments_have_one_line_messages():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2, name="d")])
    with pytest.raises(InputError, match=r"skip_layers names layers that are not in the model"
                                         r".*Received: skip_layers=\['nope'\]$"):
        quantize_model(model, skip_layers=["nope"])
    with pytest.raises(InputError, match=r"already quantized"):
        quantize_model(quantize_model(model))
    with pytest.raises(InputError, match=r"Sequential model \(start it with keras.Input\)"):
        quantize_model(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)\. Received: decay=1\.5$"):
        ActivationQuantizer(decay=1.5)
    with pytest.raises(ValueError, match=r"Received: freeze_after_step=-1$"):
        FreezeQuantization(freeze_after_step=-1)


def test_dict_inputs_and_outputs_keep_their_structure():
    # The shared rebuild packs inputs and outputs as the model has them (a KeyError before).
    keras.utils.set_random_seed(0)
    i = keras.Input((8,), name="x")
    h = layers.Dense(8, activation="relu", name="h")(i)
    model = keras.Model(i, {"b": layers.Dense(2, name="b")(h), "a": layers.Dense(3, name="a")(h)})
    out = quantize_model(model)(np.ones((2, 8), "float32"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (2, 3), "b": (2, 2)}
    p, q = keras.Input((4,), name="p"), keras.Input((4,), name="q")
    two = keras.Model({"p": p, "q": q}, layers.Dense(2)(layers.Concatenate()([p, q])))
    qat = quantize_model(two)
    x = {"p": np.ones((1, 4), "float32"), "q": np.zeros((1, 4), "float32")}
    assert [t.name for t in qat.inputs] == ["p", "q"]
    # Unobserved ranges (-6, 6): a step is 0.047; a few steps bound the difference.
    np.testing.assert_allclose(qat(x), two(x), atol=0.1)


def test_models_users_bring_get_one_line_answers():
    # A Keras op written as an expression (MobileNetV3's x * (1 / 6)) is named, and skipping
    # it works (it was a Keras "No such layer" error).
    i = keras.Input((16, 16, 3))
    x = layers.Activation("relu")(layers.Conv2D(8, 3)(i)) * 0.5
    ops_model = keras.Model(i, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    op = ops_model.operations[3].name  # Keras numbers it after the ops made before: multiply_N
    assert type(ops_model.operations[3]).__name__ == "Multiply"
    with pytest.raises(UnsupportedLayerError, match=rf"'{op}' \(Multiply op, an expression "
                                                    r"such as x \* c\)"):
        quantize_model(ops_model)
    assert quantize_model(ops_model, skip_layers=[op]).count_params() > 0
    # Rescaling by a scale would leave a float MUL: refused with the advice to skip it.
    j = keras.Input((8, 8, 3))
    scaled = keras.Model(j, layers.Dense(2)(layers.Flatten()(
        layers.Rescaling(1 / 255, name="rescaling")(j))))
    with pytest.raises(UnsupportedLayerError, match=r"'rescaling' \(Rescaling with scale="):
        quantize_model(scaled)


def test_nested_models_skip_by_name_and_may_repeat_layer_names():
    def block(name, channels):
        return keras.Sequential([keras.Input((8, 8, channels)),
                                 layers.Conv2D(8, 3, padding="same", name="conv"),
                                 layers.ReLU(name="relu")], name=name)
    i = keras.Input((8, 8, 3))
    x = block("b2", 8)(block("b1", 3)(i))
    model = keras.Model(i, layers.Dense(2, name="c1_act")(layers.GlobalAveragePooling2D()(x)))
    qat = quantize_model(model)  # two "conv" layers are two layers, not one shared one
    assert sum(isinstance(layer, QuantizeWrapper) for layer in qat.layers) == 3
    names = [layer.name for layer in qat.layers]
    assert len(names) == len(set(names))  # a quantizer never takes a user layer's name
    kept = quantize_model(model, skip_layers=["b1"])  # a nested model's name skips its layers
    assert sum(isinstance(layer, QuantizeWrapper) for layer in kept.layers) == 2


_CONV = dict(filters=8, kernel_size=3, padding="same")


@pytest.mark.parametrize("name, build", [
    ("sigmoid head", lambda x: layers.Dense(1, activation="sigmoid")(x)),
    ("Activation(sigmoid)", lambda x: layers.Activation("sigmoid")(layers.Dense(3)(x))),
    ("tanh", lambda x: layers.Dense(3, activation="tanh")(x)),
    ("swish", lambda x: layers.Dense(3)(layers.Activation("swish")(layers.Dense(8)(x)))),
    ("hard_swish", lambda x: layers.Dense(3)(layers.Activation("hard_swish")(x))),
    ("gelu", lambda x: layers.Dense(3)(layers.Dense(8, activation="gelu")(x))),
    ("LeakyReLU", lambda x: layers.Dense(3)(layers.LeakyReLU(0.1)(layers.Dense(8)(x)))),
    ("PReLU", lambda x: layers.Dense(3)(layers.PReLU()(layers.Dense(8)(x)))),
])
def test_qat_activations_convert_to_full_int8(name, build):
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(**_CONV, activation="relu")(i))
    qat = quantize_model(keras.Model(i, build(x)))
    x_ = np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")
    qat(x_, training=True)  # the ranges see the data once
    result = convert.to_tflite(qat)
    assert result.report["full_integer"], name
    step = Interpreter(model_content=result.flatbuffer).get_output_details()[0]["quantization"][0]
    got = tflite_logits(result.flatbuffer, x_)
    # Every op of the .tflite computes what the QAT model computes, to a few output steps.
    assert np.max(np.abs(got - keras.ops.convert_to_numpy(qat(x_)))) <= 3 * step


def test_squeeze_excitation_and_permute_take_qat():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(**_CONV, activation="relu")(i)
    s = layers.Dense(8, activation="sigmoid")(layers.GlobalAveragePooling2D()(x))
    x = layers.Permute((2, 1, 3))(layers.Multiply()([x, layers.Reshape((1, 1, 8))(s)]))
    qat = quantize_model(keras.Model(i, layers.Dense(3)(layers.GlobalAveragePooling2D()(x))))
    qat(np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32"), training=True)
    report = convert.to_tflite(qat).report
    assert report["full_integer"]
    assert {"MUL", "LOGISTIC", "TRANSPOSE"} <= set(report["op_counts"])
