"""`QuantizeWrapper`: a weighted layer with fake-quantized weights and an optional folded BN.

The wrapper recomputes the wrapped layer's linear op (conv, depthwise conv, separable conv or
matmul) with its kernel fake-quantized, so the TFLite converter sees a fake-quant op right on
each constant kernel and writes its int8 scales. A following BatchNormalization is folded in:

    kernel' = kernel * gamma / sqrt(var + eps)        bias' = (bias - mean) * gamma / ... + beta

and it is `kernel'` that gets quantized, so the ranges trained are the ones the int8 kernels
see. While BN statistics are still observed (see `callbacks.FreezeQuantization`), training
steps also run the unquantized float op once to update the moving mean and variance.

The wrapped layer may itself be a wrapper (the pruning `PruneWrapper`): its innermost layer
gives the layer type and weights, and its masks are folded into the kernel rather than applied
to tensors (a float MUL would break full integer): `weight_mask` on the kernel, `in_mask` on the
kernel's input rows, `out_mask` on the folded kernel *and* bias, so pruned channels stay exactly
zero through QAT and in the int8 model.

Example:
    >>> conv = keras.layers.Conv2D(8, 3, padding="same")
    >>> bn = keras.layers.BatchNormalization()
    >>> wrapped = QuantizeWrapper(conv, batch_norm=bn, name="quant_conv")
    >>> y = wrapped(np.zeros((1, 8, 8, 3), "float32"))
"""
import keras
from keras import ops

from tflite_ext import wrapping
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.pruning.handlers import FUSABLE_ACTIVATIONS, activation_name, handler_for
from tflite_ext.pruning.wrapper import PruneWrapper
from tflite_ext.quantization.quantizers import ActivationQuantizer, quantize_weight

# How the wrapper computes each kind (the layer's handler names it, `Handler.qat`). A
# BatchNormalization that follows no conv/Dense is "affine": a per-channel 1x1 depthwise conv
# (identity kernel with the BN folded in), which TFLite runs in int8.
KINDS = ("conv2d", "conv1d", "depthwise", "separable", "dense", "affine")


def layer_kind(layer):
    """The kind of `layer` (looking through a pruning wrapper), or None if not wrappable."""
    base = wrapping.unwrap(layer)
    handler = handler_for(base)
    try:
        kind = handler.qat(base) if handler is not None else None
    except UnsupportedLayerError:
        return None
    return kind if kind in KINDS else None


def _depthwise_quant(kernel):
    # Depthwise output channel c*mult+m lives on axes (2, 3); TFLite stores the kernel as
    # [1, kh, kw, cin*mult] quantized on the last axis, so quantize that layout.
    kh, kw, cin, mult = kernel.shape
    flat = ops.reshape(kernel, (kh, kw, 1, cin * mult))
    return ops.reshape(quantize_weight(flat, per_channel=True), (kh, kw, cin, mult))


def _scale_depthwise(kernel, scale):
    kh, kw, cin, mult = kernel.shape
    return ops.reshape(ops.reshape(kernel, (kh, kw, cin * mult)) * scale, (kh, kw, cin, mult))


def _global_moments(y, mean, variance):
    """The global batch's per-channel mean and variance from each replica's (a replica sees
    a slice of it; an empty slice counts for nothing): what BN sees on one device."""
    count = ops.sum(ops.ones_like(y[..., 0]))
    stats = wrapping.gather_replicas(ops.concatenate([ops.expand_dims(count, 0), mean,
                                                      variance]))
    channels = mean.shape[-1]
    n = stats[:, :1]
    seen = n > 0
    means = ops.where(seen, stats[:, 1:1 + channels], 0.0)
    variances = ops.where(seen, stats[:, 1 + channels:], 0.0)
    total = ops.sum(n)
    mean = ops.sum(n * means, axis=0) / total
    variance = ops.sum(n * (variances + ops.square(means - mean)), axis=0) / total
    return mean, variance


@keras.saving.register_keras_serializable(package="tflite_ext")
class QuantizeWrapper(wrapping.Wrapper):
    """Fake-quantizes a Conv1D/Conv2D/DepthwiseConv2D/SeparableConv2D/Dense layer's weights.

    Args:
        layer: the layer to wrap (already built or not), possibly inside a pruning wrapper.
        batch_norm: optional BatchNormalization (channels last) to fold into the layer.
    """

    survives_strip = True  # strip keeps it, sliced (see `sliced`)

    def __init__(self, layer, batch_norm=None, **kwargs):
        super().__init__(layer, **kwargs)
        self.kind = layer_kind(layer)
        if self.kind is None:
            raise UnsupportedLayerError(
                "QuantizeWrapper wraps Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D, "
                f"Dense or BatchNormalization layers. Received: layer={layer.__class__.__name__}")
        if self.kind == "affine" and batch_norm is not None:
            raise InputError("A wrapped BatchNormalization cannot fold another one. "
                             f"Received: batch_norm={batch_norm.name}")
        self.batch_norm = batch_norm
        self.mid_quantizer = None
        if self.kind == "separable":  # TFLite splits it: the depthwise output needs a range
            self.mid_quantizer = ActivationQuantizer(name=f"{self.name}_depthwise_act")
        self.logits_quantizer = None
        if self.kind != "affine" and activation_name(wrapping.unwrap(layer)) not in (
                "linear", *FUSABLE_ACTIVATIONS):
            # An activation TFLite does not fuse is an int8 op of its own (SOFTMAX, LOGISTIC,
            # TANH, HARD_SWISH...): its input needs a range; its output gets one after it
            # unless the op fixes it (quantize_model's plan).
            self.logits_quantizer = ActivationQuantizer(name=f"{self.name}_logits_act")

    def build(self, input_shape):
        super().build(input_shape)
        for quantizer in (self.mid_quantizer, self.logits_quantizer):
            if quantizer is not None and not quantizer.built:
                quantizer.build(None)
        if self.batch_norm is not None and not self.batch_norm.built:
            self.batch_norm.build(self.layer.compute_output_shape(input_shape))
        self.bn_observing = self.add_weight(name="bn_observing", shape=(), trainable=False,
                                            initializer="ones")
        self.built = True

    @property
    def _base(self):
        # A property, not an attribute: Keras would track the layer a second time.
        return wrapping.unwrap(self.layer)

    @property
    def _pruner(self):
        """The pruning wrapper inside (prune + QAT in one fit), whose masks fold in, or None."""
        return wrapping.find(self.layer, PruneWrapper)

    @property
    def _bn(self):
        """The BatchNormalization folded in (for 'affine', the wrapped layer itself)."""
        return self._base if self.kind == "affine" else self.batch_norm

    # ---- the float weights, folded -----------------------------------------------------

    def _kernels_and_bias(self):
        """The wrapped layer's kernel(s) and bias as float tensors (bias may be None)."""
        base = self._base
        if self.kind == "affine":  # identity 1x1 depthwise kernel; BN is folded into it
            return [ops.ones((1, 1, base.moving_mean.shape[0], 1))], None
        if self.kind == "separable":
            kernels = [base.depthwise_kernel, base.pointwise_kernel]
        else:
            kernels = [base.kernel]
        bias = base.bias if base.use_bias else None
        kernels = [ops.convert_to_tensor(k) for k in kernels]
        pruner = self._pruner
        if pruner is None:
            return kernels, bias
        if pruner.granularity != "channel":  # unstructured / 2:4: the pointwise kernel if any
            kernels[-1] = kernels[-1] * ops.cast(pruner.weight_mask, kernels[-1].dtype)
        # Input features live on axis -2 of every first kernel.
        in_mask = ops.cast(pruner.in_mask, kernels[0].dtype)
        kernels[0] = kernels[0] * (ops.expand_dims(in_mask, -1))
        if self.kind == "separable":
            # The pointwise rows of a pruned input (c * multiplier + m) go too: they add
            # nothing, but would widen the per-channel weight scales, which change once
            # `strip` removes them.
            rows = ops.repeat(in_mask, kernels[0].shape[-1])
            kernels[1] = kernels[1] * ops.expand_dims(rows, -1)
        return kernels, bias

    def _fold(self, kernels, bias):
        """Folds BN (moving statistics) and the pruning mask into the last kernel and bias."""
        out_kernel = kernels[-1]
        channels = self._out_channels(kernels)
        if bias is None:
            bias = ops.zeros((channels,), dtype=out_kernel.dtype)
        bias = ops.convert_to_tensor(bias)
        bn = self._bn
        if bn is not None:
            gamma = bn.gamma if bn.scale else ops.ones((channels,))
            beta = bn.beta if bn.center else ops.zeros((channels,))
            scale = gamma / ops.sqrt(bn.moving_variance + bn.epsilon)
            out_kernel = self._scale_out(out_kernel, scale)
            bias = (bias - bn.moving_mean) * scale + beta
        if self._pruner is not None:
            mask = ops.cast(ops.reshape(self._pruner.out_mask, (channels,)), out_kernel.dtype)
            out_kernel = self._scale_out(out_kernel, mask)
            bias = bias * mask
        return kernels[:-1] + [out_kernel], bias

    def _out_channels(self, kernels):
        shape = kernels[-1].shape
        return shape[2] * shape[3] if self.kind in ("depthwise", "affine") else shape[-1]

    def _scale_out(self, kernel, scale):
        if self.kind in ("depthwise", "affine"):
            return _scale_depthwise(kernel, scale)
        return kernel * scale

    def _quantize(self, kernels):
        if self.kind == "dense":
            return [quantize_weight(kernels[0], per_channel=False)]
        if self.kind in ("depthwise", "affine"):
            return [_depthwise_quant(kernels[0])]
        if self.kind == "separable":
            return [_depthwise_quant(kernels[0]), quantize_weight(kernels[1], per_channel=True)]
        if self.kind == "conv1d":  # quantize the 4-D kernel the converter will see
            return [quantize_weight(ops.expand_dims(kernels[0], 0), per_channel=True)]
        return [quantize_weight(kernels[0], per_channel=True)]

    # ---- the linear op ------------------------------------------------------------------

    def _linear(self, x, kernels, bias, training, quantized):
        base = self._base
        if self.kind == "dense":
            y = ops.matmul(x, kernels[0])
        elif self.kind == "conv1d":
            y = self._conv1d(x, kernels[0], already_4d=quantized)
        elif self.kind == "conv2d":
            y = ops.conv(x, kernels[0], strides=base.strides, padding=base.padding,
                         dilation_rate=base.dilation_rate)
        elif self.kind == "affine":
            y = self._affine(x, kernels[0])
        elif self.kind == "depthwise":
            y = ops.depthwise_conv(x, kernels[0], strides=base.strides, padding=base.padding,
                                   dilation_rate=base.dilation_rate)
        else:  # separable: depthwise, (quantized intermediate), pointwise
            y = ops.depthwise_conv(x, kernels[0], strides=base.strides, padding=base.padding,
                                   dilation_rate=base.dilation_rate)
            if quantized:
                y = self.mid_quantizer(y, training=training)
            y = ops.conv(y, kernels[1])
        return y + bias if bias is not None else y

    def _affine(self, x, kernel):
        # Any rank: viewed as (N, 1.., C) images so one int8 DEPTHWISE_CONV_2D does it.
        shape = ops.shape(x)
        rank = len(x.shape)
        if rank == 4:
            return ops.depthwise_conv(x, kernel)
        lead = (1,) * (4 - rank) if rank < 4 else ()
        y = ops.depthwise_conv(ops.reshape(x, (-1, *lead, *x.shape[1:])), kernel)
        return ops.reshape(y, shape)

    def _conv1d(self, x, kernel, already_4d):
        # Written as a 2-D conv over a height-1 image: the converter does this anyway, and a
        # per-channel fake quant must sit on the 4-D kernel or its quantized axis is lost.
        base = self._base
        padding = base.padding
        if padding == "causal":
            left = base.dilation_rate[0] * (kernel.shape[-3] - 1)
            x = ops.pad(x, ((0, 0), (left, 0), (0, 0)))
            padding = "valid"
        kernel4 = kernel if already_4d else ops.expand_dims(kernel, 0)
        y = ops.conv(ops.expand_dims(x, 1), kernel4, strides=(1, base.strides[0]),
                     padding=padding, dilation_rate=(1, base.dilation_rate[0]))
        return ops.squeeze(y, 1)

    def call(self, inputs, training=False):
        if training and self._pruner is not None:
            # What the pruning wrapper's own `call` (replaced by this one) does in training:
            # its step count and activation statistics.
            self._pruner.record_training_step(inputs)
        kernels, bias = self._kernels_and_bias()
        if training and self._bn is not None:
            self._update_bn_statistics(inputs, kernels, bias)
        kernels, bias = self._fold(kernels, bias)
        y = self._linear(inputs, self._quantize(kernels), bias, training, quantized=True)
        if self.kind == "affine":
            return y
        if self.logits_quantizer is not None:
            y = self.logits_quantizer(y, training=training)
        return self._base.activation(y)

    def _update_bn_statistics(self, inputs, kernels, bias):
        """Moving mean/variance of the *unfolded* float output, as BN would have computed."""
        y = ops.stop_gradient(self._linear(inputs, kernels, bias, False, quantized=False))
        mean, variance = ops.moments(y, axes=list(range(len(y.shape) - 1)))
        if wrapping.several_replicas():
            mean, variance = _global_moments(y, mean, variance)
        bn, keep = self._bn, self.bn_observing > 0.5
        m = bn.momentum
        bn.moving_mean.assign(ops.where(keep, bn.moving_mean * m + mean * (1 - m),
                                        bn.moving_mean))
        bn.moving_variance.assign(ops.where(keep, bn.moving_variance * m + variance * (1 - m),
                                            bn.moving_variance))

    def folded_weights(self):
        """(kernels, bias) after BN folding and masking, before quantization (numpy)."""
        kernels, bias = self._fold(*self._kernels_and_bias())
        return [ops.convert_to_numpy(k) for k in kernels], ops.convert_to_numpy(bias)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def sliced(self, inner, out_keep, name):
        """This wrapper around `inner` (sliced by `strip`), its folded BN sliced to `out_keep`.

        Exact: pruned channels were zeroed in the QAT model's kernels and bias (after
        folding), so per-channel weight ranges, the per-tensor Dense range and every
        activation range (which always holds 0) are unchanged by removing them. Ranges and
        observer states are copied.
        """
        bn, bn_weights = self.batch_norm, None
        if bn is not None:
            bn_weights = [w[out_keep] if w.ndim and w.shape[-1] == out_keep.size else w
                          for w in bn.get_weights()]
            bn = type(bn).from_config(bn.get_config())
        wrapper = QuantizeWrapper(inner, batch_norm=bn, name=name)

        def init(new):
            if bn is not None:
                new.batch_norm.set_weights(bn_weights)
            new.bn_observing.assign(self.bn_observing)
            for mine, theirs in ((new.mid_quantizer, self.mid_quantizer),
                                 (new.logits_quantizer, self.logits_quantizer)):
                if mine is not None:
                    mine.set_weights(theirs.get_weights())
        return wrapper, init

    def get_config(self):
        config = super().get_config()
        if self.batch_norm is not None:
            config["batch_norm"] = keras.saving.serialize_keras_object(self.batch_norm)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"),
                                                      custom_objects=custom_objects)
        batch_norm = config.pop("batch_norm", None)
        if batch_norm is not None:
            batch_norm = keras.saving.deserialize_keras_object(batch_norm,
                                                               custom_objects=custom_objects)
        return cls(layer, batch_norm=batch_norm, **config)
