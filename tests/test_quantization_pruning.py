"""QAT composes with structured pruning: prune -> strip -> QAT, and QAT over PruneWrappers
(masks folded into the int8 kernels, pruned channels stay exactly zero)."""
import keras
import numpy as np
import pytest
from keras import layers

from tflite_ext import inspect, pruning
from tflite_ext.quantization import QuantizeWrapper, quantize_model
from test_quantization import qat_to_tflite, tflite_logits

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def pruned(digits):
    """A conv-BN-ReLU digits model, channel-pruned to 50% in one short fit."""
    keras.utils.set_random_seed(3)
    i = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(i)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, layers.Dense(10, name="out")(x))
    model.compile(keras.optimizers.Adam(3e-3), _LOSS)
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=32, verbose=0)
    wrapped = pruning.prune(model, 0.5, layers=["c1", "c2"])
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
