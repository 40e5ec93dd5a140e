"""Small models built in code for the pruning tests, and shared checks."""
import keras
import numpy as np
from keras import layers

from tflite_ext import models
from tflite_ext.pruning import PruneWrapper, prune, strip
from tflite_ext.pruning.plan import PruningPlan


def randomize_bn(model, seed=0):
    """Gives every BatchNormalization non-trivial statistics, so a masked channel carries a
    non-zero constant after BN (the case that makes exact stripping non-trivial)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize_bn(layer, seed)
        elif isinstance(layer, layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            gamma, beta = rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.5, shapes[1])
            mean, var = rng.normal(0, 0.5, shapes[2]), rng.uniform(0.5, 2, shapes[3])
            layer.set_weights([gamma, beta, mean, var])
    return model


def masked(model, sparsity=0.5, **kwargs):
    """`prune(model)` with masks set once for `sparsity` (no training needed)."""
    pruned = prune(model, sparsity, **kwargs)
    PruningPlan(pruned).apply(sparsity)
    return pruned


def assert_strip_matches(model, sparsity=0.5, seed=0, **kwargs):
    """Prunes, strips and checks: no wrappers, fewer params, outputs equal to 1e-5."""
    randomize_bn(model, seed)
    pruned = masked(model, sparsity, **kwargs)
    small = strip(pruned)
    assert not any(isinstance(layer, PruneWrapper) for layer in small.layers)
    assert small.count_params() < model.count_params()
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(0, 1, (4,) + s).astype("float32") for s in shapes]
    xs = xs[0] if len(xs) == 1 else xs
    want = keras.ops.convert_to_numpy(pruned(xs, training=False))
    got = keras.ops.convert_to_numpy(small(xs, training=False))
    assert want.shape == got.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    return pruned, small


def sequential_cnn():
    return keras.Sequential([
        keras.Input((10, 10, 3)),
        layers.Conv2D(8, 3, name="c1"), layers.BatchNormalization(name="b1"),
        layers.ReLU(name="r1"), layers.MaxPooling2D(name="p1"),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="c2"),
        layers.Dropout(0.2, name="drop"), layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(16, activation="relu", name="fc"), layers.Dense(5, name="out"),
    ], name="seq_cnn")


def resnet():
    """ResNet-8: identity shortcut (stack 1) and 1x1 projection shortcuts (stacks 2, 3)."""
    return models.resnet8(input_shape=(16, 16, 3), num_classes=5)


def _inverted_residual(x, expand, out, stride, name):
    inp = x.shape[-1]
    y = layers.Conv2D(inp * expand, 1, use_bias=False, name=f"{name}_expand")(x)
    y = layers.BatchNormalization(name=f"{name}_expand_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    if stride == 2:
        y = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pad")(y)
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                               use_bias=False, name=f"{name}_dw")(y)
    y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
    if stride == 1 and inp == out:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2_style():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    x = _inverted_residual(x, 1, 8, 1, "b0")
    x = _inverted_residual(x, 4, 12, 2, "b1")
    x = _inverted_residual(x, 4, 12, 1, "b2")
    x = layers.Conv2D(32, 1, name="head")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs, name="mnv2_style")


def inception_dense_style():
    """Inception branches joined by Concatenate, then DenseNet-style growing concatenation."""
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    a = layers.Conv2D(6, 1, activation="relu", name="br_1x1")(x)
    b = layers.Conv2D(8, 3, padding="same", activation="relu", name="br_3x3")(x)
    c = layers.MaxPooling2D(3, strides=1, padding="same", name="br_pool")(x)
    c = layers.Conv2D(4, 1, activation="relu", name="br_pool_proj")(c)
    x = layers.Concatenate(name="mixed")([a, b, c])
    for i in range(2):
        y = layers.BatchNormalization(name=f"d{i}_bn")(x)
        y = layers.ReLU(name=f"d{i}_relu")(y)
        y = layers.Conv2D(6, 3, padding="same", name=f"d{i}_conv")(y)
        x = layers.Concatenate(name=f"d{i}_cat")([x, y])
    x = layers.Conv2D(12, 1, name="transition")(x)
    x = layers.AveragePooling2D(2, name="pool")(x)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="inception_dense")


def xception_style():
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    shortcut = layers.Conv2D(16, 1, strides=2, padding="same", name="shortcut")(x)
    shortcut = layers.BatchNormalization(name="shortcut_bn")(shortcut)
    y = layers.SeparableConv2D(16, 3, padding="same", name="sep1")(x)
    y = layers.BatchNormalization(name="sep1_bn")(y)
    y = layers.ReLU(name="sep1_relu")(y)
    y = layers.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, name="sep2")(y)
    y = layers.BatchNormalization(name="sep2_bn")(y)
    y = layers.MaxPooling2D(3, strides=2, padding="same", name="sep_pool")(y)
    x = layers.Add(name="add1")([y, shortcut])
    y = layers.ReLU(name="mid_relu")(x)
    y = layers.SeparableConv2D(16, 3, padding="same", name="sep3")(y)
    y = layers.BatchNormalization(name="sep3_bn")(y)
    x = layers.Add(name="add2")([x, y])  # identity residual around a separable conv
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="xception_style")


def conv1d_model():
    inputs = keras.Input((20, 2))
    x = layers.Conv1D(8, 5, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU(name="r1")(x)
    x = layers.DepthwiseConv1D(3, padding="same", name="dw")(x)
    x = layers.Conv1D(12, 3, strides=2, activation="relu", name="c2")(x)
    x = layers.GlobalMaxPooling1D(name="gmp")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="conv1d")


def flatten_mlp():
    """Conv features flattened into an MLP: Flatten -> Dense expands channel indices."""
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.1, name="drop")(x)
    x = layers.Dense(16, activation="relu", name="fc2")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="flatten_mlp")


def nested_model():
    """A functional model using a Sequential block and a functional block as layers."""
    block = keras.Sequential([keras.Input((8, 8, 8)), layers.Conv2D(8, 3, padding="same",
                             name="inner_conv"), layers.BatchNormalization(name="inner_bn"),
                             layers.ReLU(name="inner_relu")], name="seq_block")
    bi = keras.Input((8, 8, 8))
    bo = layers.Conv2D(6, 1, name="proj")(bi)
    proj = keras.Model(bi, bo, name="fn_block")
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.Add(name="res")([x, block(x)])
    x = proj(x)
    x = layers.Reshape((8 * 8 * 6,), name="flat")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="nested")


def sequential_cnn_8x8():
    """A tiny Sequential CNN for the digits (8x8x1 -> 10 logits), for fit-based tests."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same", name="c1"), layers.BatchNormalization(name="b1"),
        layers.ReLU(name="r1"), layers.MaxPooling2D(name="p1"),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="c2"),
        layers.GlobalAveragePooling2D(name="gap"), layers.Dense(10, name="out"),
    ], name="seq_8x8")
