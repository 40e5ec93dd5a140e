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

    After the pass each statistic is the plain mean of the batch statistics (every batch
    counts once, a last smaller one too). Returns the number of BatchNormalization layers
    updated.

    Args:
        model: a float Keras model (e.g. the result of `strip`).
        x: input samples (numpy), e.g. the training images.
        batch_size: samples per forward pass (as in training).
    """
    return recalibrator(model, x, batch_size)()


def recalibrator(model, x, batch_size=32):
    """`recalibrate_batch_norm(model, x, batch_size)` as a function to call again and again,
    traced once: for a model whose masks change between passes (a shared short run re-estimates
    under each slot's masks, `compress.shared_run`; traced anew, each ResNet-8 pass took
    1.8-2.1 s).

    Example:
        >>> again = recalibrator(pruned, x_train)
        >>> for masks in slots:
        ...     set_masks(masks)
        ...     again()
    """
    x = np.asarray(x)
    if not isinstance(batch_size, int) or batch_size < 1 or len(x) < 1:
        raise InputError("recalibrate_batch_norm needs samples and batch_size >= 1. "
                         f"Received: len(x)={len(x)}, batch_size={batch_size!r}")
    layers = _batch_norms(model)
    forward = _compiled(model, x) if layers else None

    def recalibrate():
        if not layers:
            return 0
        momenta = [layer.momentum for layer in layers]
        totals = [[0.0, 0.0] for _ in layers]
        try:
            # Momentum 0: each training-mode pass leaves its batch's statistics in the moving
            # ones, which are summed here. A momentum that changed per batch would be traced
            # once as a constant (0 is the value every pass traces and runs with). Eager calls
            # took 2.5-3.4 s after a ResNet-8 fine-tune, one traced pass 1.0 s.
            for layer in layers:
                layer.momentum = 0.0
            batches = range(0, len(x), batch_size)
            for start in batches:
                forward(x[start:start + batch_size])
                for total, layer in zip(totals, layers):
                    total[0] = total[0] + keras.ops.convert_to_numpy(layer.moving_mean)
                    total[1] = total[1] + keras.ops.convert_to_numpy(layer.moving_variance)
            for (mean, variance), layer in zip(totals, layers):
                layer.moving_mean.assign(mean / len(batches))
                layer.moving_variance.assign(variance / len(batches))
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
        return len(layers)

    return recalibrate


def _compiled(model, x):
    """`model(batch, training=True)`, traced once for batches of `x` of any size on the
    TensorFlow backend; eager elsewhere."""
    def forward(batch):
        model(batch, training=True)

    if keras.backend.backend() != "tensorflow":
        return forward
    import tensorflow as tf

    return tf.function(forward, input_signature=[tf.TensorSpec((None, *x.shape[1:]), x.dtype)])
