"""Fake-quantization primitives the TFLite converter reads as int8 scales.

Weights: symmetric int8 in the narrow range [-127, 127] (zero point 0), per output channel
for convolutions and per tensor for Dense, with the range taken from the current weights on
every call ("last value"): nothing goes stale, and the converter constant-folds the range.
Activations: asymmetric int8 with a moving-average range while training, frozen in inference.

Example:
    >>> import numpy as np
    >>> from tflite_ext.quantization import quantizers
    >>> w = np.random.randn(3, 3, 8, 16).astype("float32")
    >>> wq = quantizers.quantize_weight(w, per_channel=True)     # 16 scales, one per channel
    >>> q = quantizers.ActivationQuantizer(name="act")
    >>> y = q(np.random.rand(4, 10).astype("float32"), training=True)   # range observed
"""
import keras
from keras import ops

from tflite_ext import wrapping
from tflite_ext.errors import InputError

_EPS = 1e-8  # keeps an all-zero channel's range non-empty (the converter needs scale > 0)


def _per_channel_fake_quant(x, min_vals, max_vals, narrow_range):
    # The converter only recognises per-channel fake quant on the *last* axis of a constant
    # that feeds the kernel directly; keras.quantizers would wrap it in transposes, so call the
    # TF op itself (the TF backend is required for TFLite conversion anyway).
    import tensorflow as tf

    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, min_vals, max_vals, num_bits=8, narrow_range=narrow_range)


def quantize_weight(weight, per_channel):
    """Symmetric int8 fake quantization of a weight tensor.

    Args:
        weight: the float kernel; with `per_channel`, channels are on the last axis.
        per_channel: one scale per last-axis channel (convolutions) or one per tensor (Dense:
            per-channel Dense kernels break conversion, see references.md).

    Returns:
        The kernel rounded to the int8 grid the converter will write, as float.
    """
    weight = ops.convert_to_tensor(weight)
    if per_channel:
        reduce_axes = tuple(range(len(weight.shape) - 1))
        bound = ops.max(ops.abs(weight), axis=reduce_axes)
    else:
        bound = ops.max(ops.abs(weight))
    # The range follows the weights but is not trained: straight-through gradients only.
    bound = ops.stop_gradient(ops.maximum(bound, _EPS))
    if per_channel:
        return _per_channel_fake_quant(weight, -bound, bound, narrow_range=True)
    return keras.quantizers.fake_quant_with_min_max_vars(
        weight, -bound, bound, num_bits=8, narrow_range=True)


@keras.saving.register_keras_serializable(package="tflite_ext")
class ActivationQuantizer(keras.layers.Layer):
    """Asymmetric int8 fake quantization with a moving-average range.

    In training the range tracks an exponential moving average of each batch's min/max
    (the first observed batch sets it outright, so a short fine-tune does not drag a default
    range along). In inference the stored range is used as is. `observing` is a variable, so
    freezing (see `callbacks.FreezeQuantization`) takes effect without retracing.

    Args:
        decay: moving-average decay per training step.
        initial_range: (min, max) used before any batch is observed.

    Example:
        >>> q = ActivationQuantizer(decay=0.99)
        >>> y = q(x, training=True)
    """

    # A per-tensor fake quant: channel i out is channel i in, and 0 stays exactly 0 (the range
    # always holds 0), so pruned channels stay removed through it (`pruning.handlers`).
    tflite_ext_channel_rule = "pass_through"

    def __init__(self, decay=0.99, initial_range=(-6.0, 6.0), **kwargs):
        super().__init__(**kwargs)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise InputError(f"decay must be in [0, 1). Received: decay={decay}")
        self.decay = float(decay)
        self.initial_range = tuple(float(v) for v in initial_range)

    def build(self, input_shape):
        const = keras.initializers.Constant
        self.range_min = self.add_weight(name="range_min", shape=(), trainable=False,
                                         initializer=const(self.initial_range[0]))
        self.range_max = self.add_weight(name="range_max", shape=(), trainable=False,
                                         initializer=const(self.initial_range[1]))
        self.observed = self.add_weight(name="observed", shape=(), trainable=False,
                                        initializer="zeros")
        self.observing = self.add_weight(name="observing", shape=(), trainable=False,
                                         initializer="ones")

    def call(self, inputs, training=False):
        if training:
            self._observe(ops.stop_gradient(inputs))
        return keras.quantizers.fake_quant_with_min_max_vars(
            inputs, self.range_min, self.range_max, num_bits=8, narrow_range=False)

    def _observe(self, values):
        # The int8 range must contain 0 so that zero (padding, ReLU) is exact.
        batch_min = ops.minimum(ops.min(values), 0.0)
        batch_max = ops.maximum(ops.max(values), 0.0)
        if wrapping.several_replicas():
            # Each replica holds a slice of the global batch and its own copy of the range:
            # take the global batch's min and max, so every copy moves alike and as on one
            # device (an empty slice adds 0, which the range holds anyway).
            bounds = wrapping.gather_replicas(ops.stack([batch_min, batch_max]))
            batch_min, batch_max = ops.min(bounds[:, 0]), ops.max(bounds[:, 1])
        seen = self.observed > 0.5
        new_min = ops.where(seen, self.decay * self.range_min + (1 - self.decay) * batch_min,
                            batch_min)
        new_max = ops.where(seen, self.decay * self.range_max + (1 - self.decay) * batch_max,
                            batch_max)
        active = self.observing > 0.5
        self.range_min.assign(ops.where(active, new_min, self.range_min))
        self.range_max.assign(ops.where(active, new_max, self.range_max))
        self.observed.assign(ops.where(active, 1.0, self.observed))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "decay": self.decay,
                "initial_range": list(self.initial_range)}
