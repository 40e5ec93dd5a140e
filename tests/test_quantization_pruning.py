"""QAT composes with structured pruning: prune -> strip -> QAT; QAT over PruneWrappers (masks
folded into the int8 kernels, pruned channels stay exactly zero); and prune + QAT in one fit
(PruningCallback drives the masks inside the QuantizeWrappers), then strip -> smaller QAT model.
"""
import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from keras import layers

from tflite_ext import convert, inspect, pruning
from tflite_ext.errors import InputError
from tflite_ext.pruning import DependencyGraph
from tflite_ext.quantization import FreezeQuantization, QuantizeWrapper, quantize_model
from test_quantization import qat_to_tflite, tflite_logits

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def trained(digits):
    """A small conv-BN-ReLU digits model, trained 3 epochs in float."""
    keras.utils.set_random_seed(3)
    i = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(i)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, layers.Dense(10, name="out")(x))
    model.compile(keras.optimizers.Adam(3e-3), _LOSS)
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def pruned(trained, digits):
    """The model channel-pruned to 50% in one short fit."""
    wrapped = pruning.prune(trained, 0.5, layers=["c1", "c2"])
    wrapped.compile(keras.optimizers.Adam(1e-3), _LOSS)
    wrapped.fit(digits.x_train[:300], digits.y_train[:300], epochs=1, batch_size=32,
                verbose=0, callbacks=[pruning.PruningCallback()])
    return wrapped


def test_prune_strip_then_qat_converts_to_full_int8(pruned, digits):
    small = pruning.strip(pruned)
    qat = quantize_model(small)
    qat.compile(keras.optimizers.Adam(1e-4), _LOSS)
    qat.fit(digits.x_train[:300], digits.y_train[:300], epochs=1, batch_size=32, verbose=0)
    flatbuffer = qat_to_tflite(qat)
    info = inspect.summary(flatbuffer)
    assert info["full_integer"]
    conv_filters = sorted(t["shape"][0] for t in info["tensors"] if len(t["shape"]) == 4
                          and t["const_bytes"] and t["dtype"] == "int8")
    assert conv_filters == [4, 8]  # half of 8 and of 16: the channels are really gone
    x = digits.x_test[:200]
    agree = np.mean(qat.predict(x, verbose=0).argmax(-1) == tflite_logits(flatbuffer, x)
                    .argmax(-1))
    assert agree >= 0.97


def test_qat_over_prune_wrappers_keeps_pruned_channels_zero(pruned, digits):
    qat = quantize_model(pruned)
    wrapper = qat.get_layer("quant_c1")
    assert isinstance(wrapper.layer, pruning.PruneWrapper)
    out_mask = keras.ops.convert_to_numpy(wrapper.layer.out_mask)
    assert out_mask.sum() == 4  # the mask came along from the pruned model
    qat.compile(keras.optimizers.Adam(1e-3), _LOSS)
    qat.fit(digits.x_train[:300], digits.y_train[:300], epochs=1, batch_size=32, verbose=0)
    # BN folded in, yet pruned channels are exactly zero: mask on folded kernel *and* bias.
    (kernel,), bias = wrapper.folded_weights()
    assert np.all(kernel[..., out_mask == 0] == 0) and np.all(bias[out_mask == 0] == 0)
    features = keras.Model(qat.inputs, qat.get_layer("r1_act").output)
    activations = features.predict(digits.x_test[:50], verbose=0)
    assert np.all(activations[..., out_mask == 0] == 0)
    flatbuffer = qat_to_tflite(qat)
    assert inspect.summary(flatbuffer)["full_integer"]
    x = digits.x_test[:200]
    agree = np.mean(qat.predict(x, verbose=0).argmax(-1) == tflite_logits(flatbuffer, x)
                    .argmax(-1))
    assert agree >= 0.97
    assert isinstance(qat.get_layer("quant_c2"), QuantizeWrapper)


# ---------------------------------------------------------------- prune + QAT in one fit

_BATCHES = 20  # 640 samples, batch 32: the schedule below ends on the last batch
_SCHEDULE = dict(initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=_BATCHES,
                 frequency=5)


def _fit_prune_qat(qat, digits, epochs=1):
    callback = pruning.PruningCallback()
    qat.fit(digits.x_train[:640], digits.y_train[:640], epochs=epochs, batch_size=32,
            verbose=0, shuffle=False, callbacks=[callback, FreezeQuantization(10)])
    return callback


@pytest.fixture(scope="module")
def one_fit(trained, digits):
    """quantize_model(prune(model)) trained once with PruningCallback + FreezeQuantization."""
    keras.utils.set_random_seed(4)
    qat = quantize_model(pruning.prune(trained, pruning.PolynomialDecay(**_SCHEDULE)))
    qat.compile(keras.optimizers.Adam(1e-3), _LOSS)
    callback = _fit_prune_qat(qat, digits)
    return qat, callback


def _masks(qat):
    """{layer: (in_mask, out_mask)} of the PruneWrappers inside the QuantizeWrappers."""
    return {name: tuple(keras.ops.convert_to_numpy(m) for m in (
        qat.get_layer(name).layer.in_mask, qat.get_layer(name).layer.out_mask))
        for name in ("quant_c1", "quant_c2", "quant_out")}


def _tflite_constants(flatbuffer):
    """{shape: array} of the constant int8 kernels and int32 biases, read back with LiteRT."""
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    out = {}
    for detail in interpreter.get_tensor_details():
        if detail["dtype"] in (np.int8, np.int32) and len(detail["shape"]) in (1, 2, 4):
            try:
                value = interpreter.get_tensor(detail["index"])
            except ValueError:  # activation tensors hold no data until invoke
                continue
            out.setdefault((detail["dtype"].__name__, tuple(detail["shape"])), value)
    return out


def test_one_fit_schedule_steps_and_ramps_masks(one_fit):
    qat, callback = one_fit
    assert [s for s, _ in callback.history] == [0, 5, 10, 15, 20]
    assert callback.history[-1][1] == pytest.approx(0.5)
    for wrapper in pruning.pruning_wrappers(qat):  # found inside the QuantizeWrappers
        assert int(keras.ops.convert_to_numpy(wrapper.pruning_step)) == _BATCHES
    masks = _masks(qat)
    assert masks["quant_c1"][1].sum() == 4 and masks["quant_c2"][1].sum() == 8
    # the producer's out_mask and the consumer's in_mask agree on every channel
    np.testing.assert_array_equal(masks["quant_c1"][1], masks["quant_c2"][0])
    np.testing.assert_array_equal(masks["quant_c2"][1], masks["quant_out"][0])


def test_one_fit_converts_to_int8_with_pruned_channels_exactly_zero(one_fit, digits):
    qat, _ = one_fit
    masks = _masks(qat)
    flatbuffer = convert.to_tflite(qat).flatbuffer  # no representative data: QAT ranges
    assert inspect.summary(flatbuffer)["full_integer"]
    const = _tflite_constants(flatbuffer)
    c1, c2, fc = const[("int8", (8, 3, 3, 1))], const[("int8", (16, 3, 3, 8))], \
        const[("int8", (10, 16))]
    gone1, gone2 = masks["quant_c1"][1] == 0, masks["quant_c2"][1] == 0
    assert gone1.sum() == 4 and gone2.sum() == 8
    assert np.all(c1[gone1] == 0) and np.all(const[("int32", (8,))][gone1] == 0)
    assert np.all(c2[gone2] == 0) and np.all(c2[..., gone1] == 0)
    assert np.all(const[("int32", (16,))][gone2] == 0) and np.all(fc[:, gone2] == 0)
    assert np.count_nonzero(c1[~gone1]) > 0 and np.count_nonzero(fc[:, ~gone2]) > 0
    x = digits.x_test[:200]
    agree = np.mean(qat.predict(x, verbose=0).argmax(-1) == tflite_logits(flatbuffer, x)
                    .argmax(-1))
    assert agree >= 0.97


def test_strip_of_pruned_qat_model_is_exact_and_smaller(one_fit, digits):
    qat, _ = one_fit
    small = pruning.strip(qat)
    assert not pruning.pruning_wrappers(small)
    assert isinstance(small.get_layer("quant_c1"), QuantizeWrapper)
    x = digits.x_test[:200]
    np.testing.assert_allclose(small.predict(x, verbose=0), qat.predict(x, verbose=0),
                               atol=1e-5, rtol=0)
    big, little = convert.to_tflite(qat).flatbuffer, convert.to_tflite(small).flatbuffer
    info = inspect.summary(little)
    assert info["full_integer"] and len(little) < len(big)
    assert info["macs"] < inspect.summary(big)["macs"]
    assert ("int8", (4, 3, 3, 1)) in _tflite_constants(little)  # 8 -> 4 filters
    # Integer math over the same int8 weights, scales and biases: identical outputs.
    np.testing.assert_array_equal(tflite_logits(little, x), tflite_logits(big, x))


def test_one_fit_keras_round_trip_mid_training_continues(trained, digits, tmp_path):
    keras.utils.set_random_seed(5)
    schedule = pruning.PolynomialDecay(0.0, 0.5, 0, 2 * _BATCHES, frequency=5)
    qat = quantize_model(pruning.prune(trained, schedule))
    qat.compile(keras.optimizers.Adam(1e-3), _LOSS)
    _fit_prune_qat(qat, digits)  # half way: sparsity 0.25
    path = tmp_path / "prune_qat.keras"
    qat.save(path)
    loaded = convert.load_model(path)
    x = digits.x_test[:50]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat.predict(x, verbose=0),
                               atol=1e-6, rtol=0)
    for name, masks in _masks(qat).items():
        for got, want in zip(_masks(loaded)[name], masks):
            np.testing.assert_array_equal(got, want)
    assert int(keras.ops.convert_to_numpy(pruning.pruning_wrappers(loaded)[0].pruning_step)) \
        == _BATCHES
    loaded.compile(keras.optimizers.Adam(1e-3), _LOSS)
    callback = _fit_prune_qat(loaded, digits)
    assert [s for s, _ in callback.history] == [25, 30, 35, 40]  # the schedule resumed
    assert _masks(loaded)["quant_c2"][1].sum() == 8  # 50% at the end step
    assert inspect.summary(convert.to_tflite(pruning.strip(loaded)).flatbuffer)["full_integer"]


def test_graph_passes_channels_through_activation_quantizers(trained):
    plain = DependencyGraph(pruning.prune(trained, 0.5))
    qat = DependencyGraph(quantize_model(pruning.prune(trained, 0.5)))
    assert [(g.size, g.producers) for g in qat.groups] == [
        (8, ["quant_c1"]), (16, ["quant_c2"])]
    assert [(g.size, g.producers) for g in plain.groups] == [(8, ["c1"]), (16, ["c2"])]
    carriers = [c[0] for c in qat.groups[0].carriers]
    assert carriers == ["r1_act"]  # BN is folded into quant_c1; the quantizer carries it


def test_prune_after_quantize_and_strip_of_unpruned_qat_say_what_to_do(trained):
    qat = quantize_model(trained)
    with pytest.raises(InputError, match=r"call quantize_model\(prune\(model\)\).*already "
                                         r"wrapped"):
        pruning.prune(qat, 0.5)
    with pytest.raises(InputError, match="has no pruning wrappers"):
        pruning.strip(qat)
    with pytest.raises(InputError, match="has no pruning wrappers"):
        qat.compile("adam", _LOSS)
        qat.fit(np.zeros((4, 8, 8, 1)), np.zeros(4), epochs=1, verbose=0,
                callbacks=[pruning.PruningCallback()])


def test_strip_of_pruned_qat_separable_conv_is_exact():
    # A pruned input's pointwise rows must be zero too: they widen the per-channel weight
    # scales, which change once strip removes them (3.3e-4 here before the fix).
    keras.utils.set_random_seed(0)
    i = keras.Input((16, 16, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(i)
    x = layers.SeparableConv2D(16, 3, padding="same", depth_multiplier=2)(x)
    model = keras.Model(i, layers.Dense(4)(layers.GlobalAveragePooling2D()(x)))
    qp = quantize_model(pruning.prune(model, 0.5))
    qp.compile("adam", "mse")
    rng = np.random.default_rng(0)
    x_, y_ = rng.random((64, 16, 16, 3), np.float32), rng.random((64, 4), np.float32)
    qp.fit(x_, y_, epochs=1, verbose=0, callbacks=[pruning.PruningCallback()])
    small = pruning.strip(qp)
    np.testing.assert_allclose(small.predict(x_, verbose=0), qp.predict(x_, verbose=0),
                               atol=1e-6, rtol=0)
