"""`recalibrate_batch_norm(model, x)`: fresh BatchNormalization statistics after pruning.

Pruning changes what every BatchNormalization downstream sees, and its moving statistics
(momentum 0.99) follow slowly: after a fine-tune the inference-mode model can be worse than the
training-mode one. One pass over unlabelled training data, averaging the batch statistics
exactly, puts them back. No weight changes, no labels, no gradient.

Example:
    >>> small = strip(pruned)
    >>> recalibrate_batch_norm(small, x_train)     # then evaluate, QAT or convert
"""
import keras
import numpy as np

from tflite_ext.errors import InputError


def _batch_norms(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_batch_norms(layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def recalibrate_batch_norm(model, x, batch_size=32):
    """Replaces every BatchNormalization's moving mean/variance by the average over `x`.

    Batch k of n is given momentum (k - 1) / k, so after the pass each statistic is the plain
    mean of the n batch statistics. Returns the number of BatchNormalization layers updated.

    Args:
        model: a float Keras model (e.g. the result of `strip`).
        x: input samples (numpy), e.g. the training images.
        batch_size: samples per forward pass (as in training).
    """
    x = np.asarray(x)
    if not isinstance(batch_size, int) or batch_size < 1 or len(x) < 1:
        raise InputError("recalibrate_batch_norm needs samples and batch_size >= 1. "
                         f"Received: len(x)={len(x)}, batch_size={batch_size!r}")
    layers = _batch_norms(model)
    momenta = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, len(x), batch_size), start=1):
            for layer in layers:
                layer.momentum = (k - 1) / k
            model(x[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)
