"""The per-layer channel rules of the dependency graph (`tflite_ext.graph`).

Every piece of layer knowledge the graph has lives here: a table `HANDLERS` from layer class to
a small `Handler` that says how the layer's channels relate to its inputs' channels
("producer": new prunable space; "pass_through": channel i in, channel i out; "merge":
element-wise over inputs; "concat"; "flatten"; "reshape"; "barrier": nothing around it is
pruned). Adding a layer type means adding one entry. A custom layer opts in with
`register_handler(MyLayer, PASS_THROUGH)` or a class attribute
`tflite_ext_channel_rule = "pass_through"` (or `"barrier"`).

Wrappers (the pruning and quantization wrappers) are looked through: a layer with a
`tflite_ext_inner` property is judged by the layer it wraps, recursively.

Example:
    >>> from tflite_ext.graph_handlers import handler_for
    >>> handler_for(keras.layers.BatchNormalization()).kind
    'pass_through'
"""
import keras
import numpy as np

from tflite_ext.errors import InputError


class Handler:
    """Channel rule of one layer type: how channel maps flow and how weights are sliced.

    `kind` is one of "producer" (new prunable output space, consumes input channels),
    "pass_through" (output channels are the input channels), "merge" (element-wise op over
    inputs), "concat", "flatten", "barrier" (mixes channels: nothing around it is pruned).
    """

    kind = "barrier"

    def check(self, layer, rank):
        """Returns the kind, or "barrier" when this layer's config is not supported."""
        return self.kind


class _Producer(Handler):
    kind = "producer"

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
            return "barrier"
        return self.kind


class _Depthwise(Handler):
    kind = "pass_through"

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("depth_multiplier", 1) != 1 or cfg.get("data_format") == "channels_first":
            return "barrier"
        return self.kind


class _PassThrough(Handler):
    kind = "pass_through"

    def check(self, layer, rank):
        cfg = layer.get_config()
        if cfg.get("data_format") == "channels_first":
            return "barrier"
        axis = cfg.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            axis = axis[0] if len(axis) == 1 else None
        if "axis" in cfg and axis not in (-1, rank - 1):
            return "barrier"
        return self.kind


class _Activation(Handler):
    kind = "pass_through"

    def check(self, layer, rank):
        act = layer.get_config().get("activation")
        return "barrier" if act in ("softmax", "log_softmax") else self.kind


class _Rescaling(Handler):
    kind = "pass_through"

    def check(self, layer, rank):
        cfg = layer.get_config()
        scalar = all(np.ndim(cfg.get(k, 0)) == 0 for k in ("scale", "offset"))
        return self.kind if scalar else "barrier"


class _Merge(Handler):
    kind = "merge"


class _Concat(Handler):
    kind = "concat"


class _Flatten(Handler):
    kind = "flatten"


class _Reshape(Handler):
    kind = "reshape"


class _Barrier(Handler):
    kind = "barrier"


PASS_THROUGH = _PassThrough()
BARRIER = _Barrier()
L = keras.layers
HANDLERS = {}
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense, L.SeparableConv1D, L.SeparableConv2D):
    HANDLERS[_cls] = _Producer()
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    HANDLERS[_cls] = _Depthwise()
for _cls in (L.BatchNormalization, L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.Dropout,
             L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianDropout,
             L.GaussianNoise, L.AlphaDropout, L.ActivityRegularization, L.Identity,
             L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
             L.AveragePooling2D, L.AveragePooling3D, L.GlobalAveragePooling1D,
             L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.GlobalMaxPooling1D,
             L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.ZeroPadding1D, L.ZeroPadding2D,
             L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D, L.UpSampling1D,
             L.UpSampling2D, L.UpSampling3D):
    HANDLERS[_cls] = PASS_THROUGH
HANDLERS[L.Activation] = _Activation()
HANDLERS[L.Rescaling] = _Rescaling()
for _cls in (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average):
    HANDLERS[_cls] = _Merge()
HANDLERS[L.Concatenate] = _Concat()
HANDLERS[L.Flatten] = _Flatten()
HANDLERS[L.Reshape] = _Reshape()
for _cls in (L.InputLayer, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization,
             L.Normalization, L.Softmax, L.Permute, L.Embedding, L.RepeatVector,
             L.MultiHeadAttention, L.Attention, L.Dot):
    HANDLERS[_cls] = BARRIER
del _cls, L

_RULES = {"pass_through": PASS_THROUGH, "barrier": BARRIER}


def register_handler(layer_class, handler):
    """Teaches the graph a custom layer type.

    Args:
        layer_class: the Keras layer class.
        handler: `PASS_THROUGH` (per-channel layer: output channel i depends only on input
            channel i; its weights whose last axis is the channel axis get sliced) or `BARRIER`
            (nothing on either side of it is pruned), or a `Handler` instance.

    Example:
        >>> graph.register_handler(MyScale, graph.PASS_THROUGH)
    """
    HANDLERS[layer_class] = _rule(handler, f"handler for {layer_class.__name__}")


def _rule(handler, what):
    """A Handler from a rule name or a Handler; a one-line error for anything else."""
    if isinstance(handler, Handler):
        return handler
    if isinstance(handler, str) and handler in _RULES:
        return _RULES[handler]
    raise InputError(f"{what} must be 'pass_through', 'barrier' or a Handler. "
                     f"Received: {handler!r}")


def unwrap(layer):
    """The layer under any number of wrappers that expose `tflite_ext_inner`.

    A quantization wrapper around a pruning wrapper around a Conv2D is judged as the Conv2D.
    """
    inner = getattr(layer, "tflite_ext_inner", None)
    while inner is not None and inner is not layer:
        layer, inner = inner, getattr(inner, "tflite_ext_inner", None)
    return layer


def handler_for(layer):
    """The handler of `layer` (looking through wrappers), or None if unknown."""
    layer = unwrap(layer)
    rule = getattr(type(layer), "tflite_ext_channel_rule", None)
    if rule is not None:
        return _rule(rule, f"{type(layer).__name__}.tflite_ext_channel_rule")
    for cls in type(layer).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None
