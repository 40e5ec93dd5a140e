"""One handler per layer type: everything the library knows about that layer.

A `Handler` says how the layer's channels flow (its channel *rule* for the dependency graph),
whether `PruneWrapper` may wrap it, which kernels importance criteria score, how its weights
are sliced when `strip` keeps some input/output channels, how many MACs it costs and how QAT
treats it. `HANDLERS` maps layer classes to handlers; subclasses of a listed class share its
handler. Adding a layer type means adding one handler here (and its test).

Channel rules: "producer" (a new prunable space of output channels; reads input features),
"pass_through" (channel i out is channel i in), "merge" (element-wise over inputs),
"concat", "flatten", "reshape", "barrier" (mixes channels: nothing around it is pruned).

QAT actions (`Handler.qat`): a `QuantizeWrapper` kind ("conv2d", "conv1d", "depthwise",
"separable", "dense", "affine") for weighted layers; "output" (a range quantizer after it: a
new int8 scale); "fused_output" (the same, unless a fusable ReLU follows, which TFLite folds
in); "none" (TFLite keeps the input's scale, or a fixed one). A layer QAT cannot treat raises
`UnsupportedLayerError` with the reason.

A custom layer opts in with `register_handler(MyLayer, PASS_THROUGH)` (or `BARRIER`, or a
`Handler` of its own), or a class attribute `tflite_ext_channel_rule = "pass_through"`.

Example:
    >>> handler_for(keras.layers.Conv2D(8, 3)).rule
    'producer'
    >>> handler_for(keras.layers.MaxPooling2D()).qat(keras.layers.MaxPooling2D())
    'none'
"""
import math

import keras
import numpy as np

from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.wrapping import unwrap

# Activations QAT treats (inside a conv/Dense or as an Activation layer), each converted to a
# full-int8 op and checked: TFLite fuses relu/relu6 into the op before; softmax, sigmoid and
# tanh are int8 ops with a fixed output scale (no range of their own); the rest get a range.
# Keras 3 names swish "silu" and hard_swish "hard_silu".
FUSABLE_ACTIVATIONS = ("relu", "relu6")
FIXED_SCALE_ACTIVATIONS = ("softmax", "sigmoid", "tanh")
QAT_ACTIVATIONS = ("linear", *FUSABLE_ACTIVATIONS, *FIXED_SCALE_ACTIVATIONS, "silu", "swish",
                   "hard_silu", "hard_swish", "gelu")


def activation_name(layer):
    """The name of a layer's `activation` config ("linear" if it has none)."""
    name = layer.get_config().get("activation", "linear")
    return name if isinstance(name, str) else repr(name)


def _take(array, keep, axis):
    return np.take(array, np.nonzero(keep)[0], axis=axis)


def _positions(shape):
    return math.prod(d for d in shape[1:-1] if d)


class Handler:
    """Base: a layer nothing is known about is a barrier with no weights to slice.

    Attributes:
        rule: the channel rule (see the module docstring).
        prunable: whether `PruneWrapper` may wrap the layer.
    """

    rule = "barrier"
    prunable = False

    def __init__(self, qat=None):
        self._qat = qat  # the QAT action of every layer of this type, or None: unsupported

    def check(self, layer, rank):
        """The rule for this layer's config ("barrier" when the config is not supported)."""
        return self.rule

    def out_kernel(self, layer):
        """(weight, axis of its output channels) that importance scores, or None."""
        return None

    def in_kernel(self, layer):
        """(weight, axis of its input features) that importance scores, or None."""
        return None

    def masked_kernel(self, layer):
        """(weight, input axis) that unstructured and 2:4 masks apply to, or None."""
        return None

    def scale(self, layer):
        """Per-channel scale (BatchNormalization's gamma) for "bn_scale", or None."""
        return None

    def slice(self, config, weights, in_keep, out_keep):
        """(config, {weight name: array}) keeping the `in_keep` inputs, `out_keep` outputs."""
        return config, weights

    def macs(self, layer, in_shape, out_shape):
        """Multiply-accumulates of one call at batch 1."""
        return 0

    def qat(self, layer):
        """The QAT action for `layer`; raises UnsupportedLayerError with the reason."""
        if self._qat is None:
            raise UnsupportedLayerError(type(layer).__name__)
        return self._qat

    def fuses(self, layer):
        """Whether TFLite folds this layer into the conv/FC/add before it."""
        return False


def _weighted_qat(layer, kind):
    """`kind`, or the reason QAT cannot compute this conv/Dense/BN layer."""
    cls = type(layer).__name__
    if kind is None:
        raise UnsupportedLayerError(cls)
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(f"{cls} with data_format={layer.data_format}")
    if getattr(layer, "groups", 1) != 1:
        raise UnsupportedLayerError(f"{cls} with groups={layer.groups}")
    if activation_name(layer) not in QAT_ACTIVATIONS:
        raise UnsupportedLayerError(f"{cls} with activation={activation_name(layer)}")
    return kind


class Conv(Handler):
    """Conv1D/2D/3D and Dense: kernel (..., in, out), optional bias (out)."""

    rule = "producer"
    prunable = True
    in_axis, out_axis = -2, -1  # of the kernel

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
            return "barrier"
        return self.rule

    def out_kernel(self, layer):
        return layer.kernel, self.out_axis

    def in_kernel(self, layer):
        return layer.kernel, self.in_axis

    def masked_kernel(self, layer):
        return layer.kernel, self.in_axis

    def slice(self, config, weights, in_keep, out_keep):
        config["units" if "units" in config else "filters"] = int(out_keep.sum())
        out = dict(weights)
        kernel = _take(weights["kernel"], in_keep, self.in_axis)
        out["kernel"] = _take(kernel, out_keep, self.out_axis)
        if "bias" in weights:
            out["bias"] = weights["bias"][out_keep]
        return config, out

    def macs(self, layer, in_shape, out_shape):
        return _positions(out_shape) * math.prod(layer.kernel.shape)

    def qat(self, layer):
        return _weighted_qat(layer, self._qat)


class ConvTranspose(Conv):
    """Conv1D/2D/3DTranspose: kernel (..., out, in), bias (out); every input position
    scatters the whole kernel. QAT does not treat it (post-training int8 converts it)."""

    in_axis, out_axis = -1, -2

    def macs(self, layer, in_shape, out_shape):
        return _positions(in_shape) * math.prod(layer.kernel.shape)


class Separable(Conv):
    """SeparableConv1D/2D: depthwise (..., in, mult), then pointwise (1.., in*mult, out)."""

    def out_kernel(self, layer):
        return layer.pointwise_kernel, -1

    def in_kernel(self, layer):
        return layer.depthwise_kernel, -2

    def masked_kernel(self, layer):
        return layer.pointwise_kernel, -2

    def slice(self, config, weights, in_keep, out_keep):
        config["filters"] = int(out_keep.sum())
        mult = weights["pointwise_kernel"].shape[-2] // in_keep.size
        out = dict(weights)
        out["depthwise_kernel"] = _take(weights["depthwise_kernel"], in_keep, -2)
        out["pointwise_kernel"] = _take(_take(weights["pointwise_kernel"],
                                              np.repeat(in_keep, mult), -2), out_keep, -1)
        if "bias" in weights:
            out["bias"] = weights["bias"][out_keep]
        return config, out

    def macs(self, layer, in_shape, out_shape):
        k = math.prod(layer.depthwise_kernel.shape[:-2])
        mid = layer.depthwise_kernel.shape[-2] * layer.depthwise_kernel.shape[-1]
        return _positions(out_shape) * (mid * k + mid * out_shape[-1])


class PerChannel(Handler):
    """Output channel i depends on input channel i alone; weights on the last axis are
    per channel (PReLU's alpha). Activations, pooling, padding, cropping, dropout..."""

    rule = "pass_through"

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("data_format") == "channels_first":
            return "barrier"
        axis = cfg.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            axis = axis[0] if len(axis) == 1 else None
        if "axis" in cfg and axis not in (-1, rank - 1):
            return "barrier"
        return self.rule

    def slice(self, config, weights, in_keep, out_keep):
        return config, {name: _take(w, in_keep, -1) if w.ndim and w.shape[-1] == in_keep.size
                        else w for name, w in weights.items()}


class BatchNorm(PerChannel):
    """BatchNormalization: per-channel gamma, beta and statistics; in QAT it is folded into
    the conv before it, or else computed as a 1x1 depthwise conv ("affine")."""

    def scale(self, layer):
        return layer.gamma if layer.scale else None

    def qat(self, layer):
        try:
            last = len(layer.input.shape) - 1
        except AttributeError:  # not called yet (a wrapper made by hand): judged when it is
            last = layer.axis
        if layer.axis not in (-1, last):
            raise UnsupportedLayerError(f"BatchNormalization with axis={layer.axis}")
        return "affine"


class Depthwise(PerChannel):
    """DepthwiseConv1D/2D with depth multiplier 1: kernel (..., C, 1) and bias carry the
    channels through."""

    prunable = True

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("depth_multiplier", 1) != 1 or cfg.get("data_format") == "channels_first":
            return "barrier"
        return self.rule

    def in_kernel(self, layer):
        return layer.kernel, -2

    def masked_kernel(self, layer):
        return layer.kernel, -2

    def slice(self, config, weights, in_keep, out_keep):
        out = dict(weights)
        out["kernel"] = _take(weights["kernel"], in_keep, -2)
        if "bias" in weights:
            out["bias"] = weights["bias"][in_keep]
        return config, out

    def macs(self, layer, in_shape, out_shape):
        return _positions(out_shape) * out_shape[-1] * math.prod(layer.kernel.shape[:-2])

    def qat(self, layer):
        return _weighted_qat(layer, self._qat)


class Relu(PerChannel):
    """ReLU: a new int8 scale, folded into the op before it when plain or capped at 6."""

    def __init__(self):
        super().__init__(qat="output")

    def fuses(self, layer):
        cfg = layer.get_config()
        return (not cfg["negative_slope"] and not cfg["threshold"]
                and cfg["max_value"] in (None, 6, 6.0))


class Activation(PerChannel):
    """Activation(name): softmax mixes channels; relu/relu6 fuse in TFLite; see
    QAT_ACTIVATIONS for the ones QAT treats."""

    def check(self, layer, rank):
        return "barrier" if activation_name(layer) in ("softmax", "log_softmax") else self.rule

    def qat(self, layer):
        name = activation_name(layer)
        if name not in QAT_ACTIVATIONS:
            raise UnsupportedLayerError(f"Activation({name})")
        return "none" if name in ("linear", *FIXED_SCALE_ACTIVATIONS) else "output"

    def fuses(self, layer):
        return activation_name(layer) in FUSABLE_ACTIVATIONS


class Resize(PerChannel):
    """UpSampling2D and Resizing: each channel resized alone. Nearest keeps the int8 scale;
    bilinear (and the rest) makes new values, which get their own range in QAT."""

    def qat(self, layer):
        return "none" if layer.get_config().get("interpolation") == "nearest" else "output"


class Rescaling(PerChannel):
    """x * scale + offset with scalars (also `strip`'s constant add for a removed branch)."""

    def __init__(self):
        super().__init__(qat="fused_output")

    def check(self, layer, rank):
        cfg = layer.get_config()
        scalar = all(np.ndim(cfg.get(k, 0)) == 0 for k in ("scale", "offset"))
        return self.rule if scalar else "barrier"

    def qat(self, layer):
        # Only x + c becomes an int8 ADD from the fake-quant ranges alone; the MUL of a scale
        # would keep a float constant. At the model input, leave it in float (skip_layers).
        if np.any(np.asarray(layer.get_config().get("scale", 1.0)) != 1.0):
            raise UnsupportedLayerError(f"Rescaling with scale={layer.scale}")
        return super().qat(layer)


class Reshape(PerChannel):
    """Reshape: kept channel-last is pass-through, to 1-D is a flatten, else a barrier."""

    rule = "reshape"

    def slice(self, config, weights, in_keep, out_keep):
        target = list(config["target_shape"])
        target[-1] = int(out_keep.sum())
        config["target_shape"] = tuple(target)
        return config, weights


class _Rule(Handler):
    """A layer whose handler is its rule alone (merges, concat, flatten, barriers)."""

    def __init__(self, rule, qat=None):
        super().__init__(qat)
        self.rule = rule


PASS_THROUGH = PerChannel()
BARRIER = _Rule("barrier")
L = keras.layers
HANDLERS = {}


def _table(handler, *classes):
    for cls in classes:
        HANDLERS[cls] = handler


_table(Conv(), L.Conv3D)
_table(Conv(qat="conv1d"), L.Conv1D)
_table(Conv(qat="conv2d"), L.Conv2D)
_table(Conv(qat="dense"), L.Dense)
_table(ConvTranspose(), L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_table(Separable(), L.SeparableConv1D)
_table(Separable(qat="separable"), L.SeparableConv2D)
_table(Depthwise(), L.DepthwiseConv1D)
_table(Depthwise(qat="depthwise"), L.DepthwiseConv2D)
_table(BatchNorm(), L.BatchNormalization)
_table(Relu(), L.ReLU)
_table(Activation(), L.Activation)
_table(Rescaling(), L.Rescaling)
_table(Resize(), L.UpSampling2D, L.Resizing)
_table(PerChannel(qat="output"), L.GlobalAveragePooling1D, L.GlobalAveragePooling2D)
_table(PerChannel(qat="none"), L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D,
       L.AveragePooling2D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.ZeroPadding1D,
       L.ZeroPadding2D, L.Cropping1D, L.Cropping2D, L.Dropout, L.Identity)
# int8 LEAKY_RELU and PRELU make new values: a range each.
_table(PerChannel(qat="output"), L.LeakyReLU, L.PReLU)
_table(PASS_THROUGH, L.ELU, L.SpatialDropout1D, L.SpatialDropout2D,
       L.SpatialDropout3D, L.GaussianDropout, L.GaussianNoise, L.AlphaDropout,
       L.ActivityRegularization, L.MaxPooling3D, L.AveragePooling3D, L.GlobalAveragePooling3D,
       L.GlobalMaxPooling3D, L.ZeroPadding3D, L.Cropping3D, L.UpSampling1D, L.UpSampling3D)
_table(_Rule("merge", qat="fused_output"), L.Add)
_table(_Rule("merge", qat="output"), L.Multiply)  # squeeze-excitation: an int8 MUL
_table(_Rule("merge"), L.Subtract, L.Maximum, L.Minimum, L.Average)
_table(_Rule("concat", qat="output"), L.Concatenate)
_table(_Rule("flatten", qat="none"), L.Flatten)
_table(Reshape(qat="none"), L.Reshape)
# int8 SOFTMAX has a fixed output scale: no range of its own.
_table(_Rule("barrier", qat="none"), L.Softmax)
_table(_Rule("barrier", qat="none"), L.Permute)  # an int8 TRANSPOSE keeps the scale
_table(BARRIER, L.InputLayer, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization,
       L.Normalization, L.Embedding, L.RepeatVector, L.MultiHeadAttention,
       L.Attention, L.Dot)
del L

_RULES = {"pass_through": PASS_THROUGH, "barrier": BARRIER}

# Keras ops written as expressions that act on each element alike (`x + 3.0`, `ops.relu6`):
# on a tensor and numbers, or on tensors of the output's shape, channel i out depends on
# channel i in alone. MobileNetV3's hard-swish is `x * relu6(x + 3) * (1 / 6)`.
ELEMENTWISE_OPS = frozenset((
    "Absolute", "Add", "Clip", "Elu", "Exp", "Gelu", "HardSigmoid", "HardSilu", "LeakyRelu",
    "Log", "Maximum", "Minimum", "Multiply", "Negative", "Power", "Relu", "Relu6", "Selu",
    "Sigmoid", "Silu", "Softplus", "Softsign", "Sqrt", "Square", "Subtract", "Tanh",
    "TrueDivide"))
_OP_PASS = _Rule("pass_through")  # an op has no config or weights: its rule alone
_MERGE = _Rule("merge")


def op_handler(op, args, tensor_shapes, out_shape):
    """The handler of a Keras op (not a layer) called with `args` (its tensors replaced by
    references), or None: an `ELEMENTWISE_OPS` op whose other arguments are numbers and whose
    tensors have the output's shape is pass-through (one tensor) or a merge (several). A
    per-channel constant would need slicing: not handled.

    Example:
        >>> op_handler(add_op, [{"__tensor__": "x"}, 3.0], [(None, 8, 8, 16)],
        ...            (None, 8, 8, 16)).rule      # x + 3.0
        'pass_through'
    """
    if type(op).__name__ not in ELEMENTWISE_OPS or not tensor_shapes:
        return None
    if out_shape is None or any(shape is None or tuple(shape) != tuple(out_shape)
                                for shape in tensor_shapes):
        return None  # broadcast: a tensor of another shape
    if not all(isinstance(v, (int, float)) for v in _constants(args)):
        return None
    return _OP_PASS if len(tensor_shapes) == 1 else _MERGE


def _constants(obj):
    """The non-tensor leaves of call arguments (`functional.Node.args` and kwargs)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return []
        return [leaf for v in obj.values() for leaf in _constants(v)]
    if isinstance(obj, (list, tuple)):
        return [leaf for v in obj for leaf in _constants(v)]
    return [obj] if obj is not None else []


def register_handler(layer_class, handler):
    """Teaches the library a custom layer type.

    Args:
        layer_class: the Keras layer class.
        handler: `PASS_THROUGH` (per-channel layer: output channel i depends only on input
            channel i; its weights whose last axis is the channel axis get sliced) or `BARRIER`
            (nothing on either side of it is pruned), their names, or a `Handler` instance.

    Example:
        >>> pruning.register_handler(MyScale, pruning.PASS_THROUGH)
    """
    HANDLERS[layer_class] = _rule(handler, f"handler for {layer_class.__name__}")
    _GENERATION[0] += 1


_GENERATION = [0]


def generation():
    """How many times `register_handler` has run (cached graphs built before are stale)."""
    return _GENERATION[0]


def _rule(handler, what):
    """A Handler from a rule name or a Handler; a one-line error for anything else."""
    if isinstance(handler, Handler):
        return handler
    if isinstance(handler, str) and handler in _RULES:
        return _RULES[handler]
    raise InputError(f"{what} must be 'pass_through', 'barrier' or a Handler. "
                     f"Received: {handler!r}")


def handler_for(layer):
    """The handler of `layer` (looking through the project's wrappers), or None if unknown."""
    layer = unwrap(layer)
    rule = getattr(type(layer), "tflite_ext_channel_rule", None)
    if rule is not None:
        return _rule(rule, f"{type(layer).__name__}.tflite_ext_channel_rule")
    for cls in type(layer).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None
