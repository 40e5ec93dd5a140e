"""Reference models from references.md, built offline with Keras 3.

Example:
    >>> from tflite_ext import models
    >>> model = models.digits_cnn()           # the peer-comparison CNN, 8x8x1 -> 10 logits
    >>> mlp = models.dense_digits()           # Dense 512-512 on the digits (factorization)
    >>> resnet = models.resnet8()             # MLPerf Tiny image classification, 32x32x3
    >>> kws = models.ds_cnn()                 # MLPerf Tiny keyword spotting, 49x10x1
"""
import keras
from keras import layers

from tflite_ext import tracing


def digits_cnn(input_shape=(8, 8, 1), num_classes=10):
    """Conv64-BN-ReLU, Conv128-BN-ReLU, MaxPool, Conv128-ReLU, GAP, Dense256, Dense(logits)."""
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(64, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(128, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def dense_digits(input_shape=(8, 8, 1), num_classes=10, width=512):
    """Flatten, Dense 512 ReLU, Dense 512 ReLU, Dense (logits): the dense-heavy model that low-rank
    factorization targets (301,066 parameters on the digits)."""
    inputs = keras.Input(input_shape, name="image")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(width, activation="relu", name="fc1")(x)
    x = layers.Dense(width, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="dense_digits")


def _conv_bn(x, filters, kernel, strides, name, relu=True):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same",
                      kernel_regularizer=keras.regularizers.l2(1e-4), name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def resnet8(input_shape=(32, 32, 3), num_classes=10):
    """MLPerf Tiny ResNet-8: a 16-filter stem and three residual stacks (16, 32, 64)."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, 16, 3, 1, "stem")
    for i, (filters, strides) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        y = _conv_bn(x, filters, 3, strides, f"s{i}a")
        y = _conv_bn(y, filters, 3, 1, f"s{i}b", relu=False)
        if strides != 1:
            x = layers.Conv2D(filters, 1, strides=strides, padding="same",
                              kernel_regularizer=keras.regularizers.l2(1e-4),
                              name=f"s{i}_shortcut")(x)
        x = layers.Add(name=f"s{i}_add")([x, y])
        x = layers.ReLU(name=f"s{i}_out")(x)
    x = layers.AveragePooling2D(pool_size=x.shape[1], name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet8")


def ds_cnn(input_shape=(49, 10, 1), num_classes=12, filters=64, blocks=4):
    """MLPerf Tiny DS-CNN: Conv(10x4, stride 2) then depthwise-separable blocks."""
    inputs = keras.Input(input_shape, name="mfcc")
    x = layers.Conv2D(filters, (10, 4), strides=2, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i in range(1, blocks + 1):
        x = layers.DepthwiseConv2D(3, padding="same", name=f"b{i}_dw")(x)
        x = layers.BatchNormalization(name=f"b{i}_dw_bn")(x)
        x = layers.ReLU(name=f"b{i}_dw_relu")(x)
        x = layers.Conv2D(filters, 1, name=f"b{i}_pw")(x)
        x = layers.BatchNormalization(name=f"b{i}_pw_bn")(x)
        x = layers.ReLU(name=f"b{i}_pw_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")


def compile_classifier(model, learning_rate=1e-3):
    """Compiles a logits classifier with Adam and sparse categorical cross-entropy, its
    optimizer built (`tracing`): set `trainable` flags before, not after."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tracing.accuracy()],
    )
    return tracing.build_optimizer(model)  # `fit` then traces its train step once
