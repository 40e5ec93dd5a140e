"""A TensorFlow CPU bug that kills training, and the warning that names the layers it hits.

In TF 2.21 (bundled oneDNN 3.7.3) on x86-64, oneDNN's kernel for the filter gradient of a 1x1
Conv2D with stride > 1 and fewer than 16 input channels (its channel block with AVX-512)
writes past its workspace (uxlfoundation/oneDNN#6035): `fit` on some batch sizes (e.g. 9)
dies with "double free or corruption" or a segfault. Published models have such a layer
(a ResNet's projection shortcut on a thin stem), and stripping one to 8 channels makes one.
`prune`, `strip` and `quantize_model` warn when the model they return has it, since that
model is about to be trained; TF_ENABLE_ONEDNN_OPTS=0, set before TensorFlow is imported,
avoids it.

Example:
    >>> warn_if_training_crashes(model.layers, "prune()")   # RuntimeWarning naming the layers
"""
import os
import platform
import warnings

import keras

from tflite_ext import wrapping


def crashing_convs(layers):
    """Names of the Conv2D layers (looked through the project's wrappers) that hit the bug."""
    names = []
    for layer in layers:
        conv = wrapping.unwrap(layer)
        if (isinstance(conv, keras.layers.Conv2D) and conv.groups == 1 and conv.built
                and all(k == 1 for k in conv.kernel_size) and any(s > 1 for s in conv.strides)
                and conv.kernel.shape[-2] < 16):
            names.append(conv.name)
    return names


def warn_if_training_crashes(layers, made_by):
    """A RuntimeWarning if training `layers` with oneDNN on can crash; `made_by` names the
    call that made the model ("strip()")."""
    # oneDNN is TF's default on x86-64. TF reads the variable once, at import, so a value set
    # after importing TensorFlow is seen here but too late for TF (then no warning, a crash).
    onednn_off = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false")
    if (keras.backend.backend() != "tensorflow" or onednn_off
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return
    names = crashing_convs(layers)
    if names:
        warnings.warn(
            f"{made_by} returns a model with strided 1x1 Conv2D layers with fewer than 16 input "
            f"channels ({', '.join(names)}): training them with TensorFlow's oneDNN CPU "
            "kernels can crash the process (uxlfoundation/oneDNN#6035); set "
            "TF_ENABLE_ONEDNN_OPTS=0 before importing TensorFlow to fit this model.",
            RuntimeWarning, stacklevel=3)
