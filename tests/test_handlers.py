"""One handler per layer type: Conv2DTranspose and Resizing added as one handler each, and the
dependency graph built once per model."""
import keras
import numpy as np
import pytest
from keras import layers

from tests import pruning_models as pm
from tflite_ext import convert, inspect, pruning
from tflite_ext.errors import UnsupportedLayerError
from tflite_ext.pruning import graph as graph_lib
from tflite_ext.pruning.handlers import ConvTranspose, Resize, handler_for
from tflite_ext.quantization import ActivationQuantizer, quantize_model


def _decoder():
    """A U-Net style decoder step: conv, transposed conv up 2x, BN, ReLU, 1x1 head."""
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="enc")(i)
    x = layers.Conv2DTranspose(12, 3, strides=2, padding="same", name="up")(x)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    x = layers.Conv2D(4, 1, name="head")(x)
    return pm.randomize_bn(keras.Model(i, layers.GlobalAveragePooling2D()(x)))


def _resizer(interpolation):
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(i)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Resizing(12, 12, interpolation=interpolation, name="resize")(x)
    x = layers.Cropping2D(1, name="crop")(x)
    x = layers.Conv2D(4, 3, name="c2")(x)
    return pm.randomize_bn(keras.Model(i, layers.Dense(3)(layers.GlobalAveragePooling2D()(x))))


def _x(n=16, shape=(8, 8, 3)):
    return np.random.default_rng(0).random((n, *shape)).astype("float32")


def test_conv_transpose_is_a_producer_with_its_own_kernel_layout():
    model = _decoder()
    assert isinstance(handler_for(model.get_layer("up")), ConvTranspose)
    g = graph_lib.DependencyGraph(model)
    up = next(grp for grp in g.groups if grp.producers == ["up"])
    assert up.size == 12 and [c[0] for c in up.carriers] == ["bn"]
    assert [c[0] for c in up.consumers] == ["head"]
    enc = next(grp for grp in g.groups if grp.producers == ["enc"])
    assert [c[0] for c in enc.consumers] == ["up"]  # its input features are enc's channels
    # MACs: every input position scatters the whole 3x3x12x16 kernel
    assert pruning.count_macs(model) == 64 * 3 * 3 * 3 * 16 + 64 * 3 * 3 * 12 * 16 + 256 * 12 * 4


def test_conv_transpose_strips_exactly_and_converts_to_int8():
    model = _decoder()
    pruned = pm.masked(model, 0.5)
    small = pruning.strip(pruned)
    up = small.get_layer("up")
    assert up.filters == 6 and tuple(up.kernel.shape) == (3, 3, 6, 8)  # (k, k, out, in)
    x = _x()
    np.testing.assert_allclose(small(x), pruned(x), atol=1e-5)
    assert pruning.count_macs(small) == 64 * 27 * 8 + 64 * 9 * 6 * 8 + 256 * 6 * 4
    result = convert.to_tflite(small, x)  # post-training int8: TRANSPOSE_CONV runs in int8
    assert inspect.summary(result.flatbuffer)["full_integer"]


def test_conv_transpose_is_refused_by_qat_in_one_line():
    with pytest.raises(UnsupportedLayerError, match=r"'up' \(Conv2DTranspose\).*"
                                                    r"skip_layers=\['up'\]"):
        quantize_model(_decoder())


@pytest.mark.parametrize("interpolation, quantizers", [("bilinear", 1), ("nearest", 0)])
def test_resizing_passes_channels_through_and_quantizes(interpolation, quantizers):
    model = _resizer(interpolation)
    assert isinstance(handler_for(model.get_layer("resize")), Resize)
    g = graph_lib.DependencyGraph(model)
    c1 = next(grp for grp in g.groups if grp.producers == ["c1"])
    assert [c[0] for c in c1.consumers] == ["c2"]  # through Resizing and Cropping2D
    pruned = pm.masked(model, 0.5)
    small = pruning.strip(pruned)
    assert small.get_layer("c1").filters == 4
    np.testing.assert_allclose(small(_x()), pruned(_x()), atol=1e-5)
    # QAT: bilinear makes new values (their own range), nearest and cropping keep the scale.
    qat = quantize_model(small)
    names = [layer.name for layer in qat.layers if isinstance(layer, ActivationQuantizer)]
    assert names.count("resize_act") == quantizers and "crop_act" not in names
    qat(_x(), training=True)  # observe ranges once
    assert inspect.summary(convert.to_tflite(qat).flatbuffer)["full_integer"]


def test_graph_is_built_once_per_model(monkeypatch):
    builds = []
    real = graph_lib.DependencyGraph.__init__
    monkeypatch.setattr(graph_lib.DependencyGraph, "__init__",
                        lambda self, model, opaque=(): builds.append(model.name)
                        or real(self, model, opaque))
    model = pm.resnet()
    pruned = pruning.prune(model, 0.5, round_to=8)                # the float model's graph
    callback = pruning.PruningCallback()
    callback.set_model(pruned)
    callback.on_train_begin()                                     # the pruned model's graph
    pruning.count_macs(pruned)
    pruning.count_macs(model)
    small = pruning.strip(pruned)
    assert builds == [model.name, pruned.name]
    assert graph_lib.graph_of(pruned) is callback._plan.graph
    pruning.count_macs(small)
    assert len(builds) == 3                                       # a new model: a new graph


def test_a_sequential_model_that_grows_gets_a_new_graph():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(8), layers.Dense(3)])
    before = graph_lib.graph_of(model)
    assert graph_lib.graph_of(model) is before
    model.add(layers.Dense(2))
    assert graph_lib.graph_of(model) is not before
    assert pruning.count_macs(model) == 4 * 8 + 8 * 3 + 3 * 2
