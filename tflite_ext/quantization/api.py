"""`quantize_model`: quantization-aware training for Keras 3 functional and Sequential models.

The model is rebuilt layer by layer (`keras.models.clone_model` with a `call_function`):
weighted layers go into a `QuantizeWrapper` (fake-quantized kernels, following BN folded in),
and an `ActivationQuantizer` is placed wherever the int8 graph gets a new scale: the model
inputs and the outputs of convolutions, Dense, Add, Concatenate, activations and global
average pooling. A conv or Add whose only consumer is a ReLU/ReLU6 gets no quantizer of its
own (TFLite fuses the activation, so only the activated tensor exists in int8). Layers that
keep their input scale in TFLite (pooling, reshape, flatten, padding, nearest upsampling,
dropout) and Softmax (fixed 1/256 output scale) get none.

Example:
    >>> from tflite_ext import models, tasks
    >>> from tflite_ext.quantization import quantize_model, FreezeQuantization
    >>> qat = quantize_model(trained_float_model)
    >>> models.compile_classifier(qat, learning_rate=1e-4)
    >>> qat.fit(x, y, epochs=5, callbacks=[FreezeQuantization(freeze_after_step=150)])
    >>> # then: TFLiteConverter(optimizations=[DEFAULT], int8 I/O), no representative data
"""
import collections

import keras
from keras import layers

from tflite_ext import graph_handlers
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.quantization.quantizers import ActivationQuantizer
from tflite_ext.quantization.wrapper import (QuantizeWrapper, _activation_name, innermost,
                                             layer_kind)

# A per-tensor fake quant: channel i out is channel i in, and 0 stays exactly 0 (the range
# always holds 0), so pruned channels stay removed through it. The pruning graph must know.
graph_handlers.register_handler(ActivationQuantizer, graph_handlers.PASS_THROUGH)

# TFLite keeps the input's scale through these (or needs none): no quantizer after them.
_SAME_SCALE = (layers.MaxPooling1D, layers.MaxPooling2D, layers.AveragePooling1D,
               layers.AveragePooling2D, layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D,
               layers.Reshape, layers.Flatten, layers.ZeroPadding1D, layers.ZeroPadding2D,
               layers.Dropout, layers.InputLayer)
# These compute new values: their output gets a quantizer.
# Rescaling is `strip`'s constant add for a removed residual branch (x * 1 + c: one ADD).
_NEW_SCALE = (layers.Add, layers.Rescaling, layers.Concatenate, layers.GlobalAveragePooling1D,
              layers.GlobalAveragePooling2D, layers.BatchNormalization, layers.ReLU)
_FUSABLE_ACTIVATIONS = ("relu", "relu6")
_LAYER_ACTIVATIONS = ("linear", "relu", "relu6", "softmax")


def _fusable_activation(layer):
    """True for a layer TFLite folds into the preceding conv/FC/add as a fused activation."""
    if isinstance(layer, layers.ReLU):
        cfg = layer.get_config()
        plain = not cfg["negative_slope"] and not cfg["threshold"]
        return plain and cfg["max_value"] in (None, 6, 6.0)
    if isinstance(layer, layers.Activation):
        return _activation_name(layer) in _FUSABLE_ACTIVATIONS
    return False


def _unsupported_reason(layer):
    """None if quantize_model handles `layer`, else a short description of the problem."""
    cls = innermost(layer).__class__.__name__
    if isinstance(layer, keras.Model):
        return f"{cls} (nested model)"
    if layer_kind(layer) is not None:
        base = innermost(layer)
        if getattr(base, "data_format", "channels_last") != "channels_last":
            return f"{cls} with data_format={base.data_format}"
        if isinstance(base, layers.BatchNormalization) and base.axis not in (
                -1, len(base.input.shape) - 1):
            return f"BatchNormalization with axis={base.axis}"
        if getattr(base, "groups", 1) != 1:
            return f"{cls} with groups={base.groups}"
        if _activation_name(base) not in _LAYER_ACTIVATIONS:
            return f"{cls} with activation={_activation_name(base)}"
        return None
    if isinstance(layer, layers.Activation):
        name = _activation_name(layer)
        return None if name in _LAYER_ACTIVATIONS else f"Activation({name})"
    if isinstance(layer, layers.UpSampling2D):
        return None
    if isinstance(layer, (layers.Softmax,) + _SAME_SCALE + _NEW_SCALE):
        return None
    return cls


def _history_names(node):
    """Names of the layers whose outputs feed one serialized node (any nesting)."""
    if isinstance(node, dict):
        if "keras_history" in node:
            return [node["keras_history"][0]]
        return [n for v in node.values() for n in _history_names(v)]
    if isinstance(node, (list, tuple)):
        return [n for v in node for n in _history_names(v)]
    return []


def _graph(functional):
    """(consumers: name -> [consumer names], call counts: name -> int, output names)."""
    config = functional.get_config()
    consumers, calls = collections.defaultdict(list), {}
    for layer_cfg in config["layers"]:
        calls[layer_cfg["name"]] = len(layer_cfg["inbound_nodes"])
        for producer in _history_names(layer_cfg["inbound_nodes"]):
            consumers[producer].append(layer_cfg["name"])
    outputs = config["output_layers"]
    if outputs and isinstance(outputs[0], str):
        outputs = [outputs]
    return consumers, calls, {o[0] for o in outputs}


def _as_functional(model):
    if isinstance(model, keras.Sequential):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if not inputs:
            raise InputError("quantize_model needs a built Sequential model (start it with "
                             f"keras.Input). Received: model={model.name} (not built)")
        return keras.Model(inputs, outputs, name=model.name)
    if isinstance(model, keras.Model) and hasattr(model, "_run_through_graph"):
        return model
    raise InputError("quantize_model needs a functional or Sequential Keras model. "
                     f"Received: model={type(model).__name__}")


def _plan(functional, skip, fold_batch_norm):
    """Per layer name: (action, folded BN name, quantize output?)."""
    consumers, calls, outputs = _graph(functional)
    by_name = {layer.name: layer for layer in functional.layers}

    def only_consumer(name):
        cons = consumers.get(name, [])
        if len(cons) != 1 or name in outputs:
            return None
        return by_name[cons[0]]

    plan, folded = {}, set()
    for layer in functional.layers:
        name = layer.name
        if isinstance(layer, layers.InputLayer):
            continue
        if name in skip:
            plan[name] = ("copy", None, True)
            continue
        if layer_kind(layer) is not None:
            bn = only_consumer(name)
            foldable = (fold_batch_norm and isinstance(bn, layers.BatchNormalization)
                        and not isinstance(layer, layers.BatchNormalization)
                        and bn.name not in skip and calls[bn.name] == 1
                        and bn.axis in (-1, len(bn.input.shape) - 1)
                        and _activation_name(innermost(layer)) == "linear")
            bn = bn if foldable else None
            if bn is not None:
                folded.add(bn.name)
            act = _activation_name(innermost(layer))
            tail = bn.name if bn is not None else name
            nxt = only_consumer(tail)
            fuse = act == "linear" and nxt is not None and _fusable_activation(nxt)
            plan[name] = ("wrap", bn.name if bn else None, not fuse and act != "softmax")
        elif isinstance(layer, (layers.Add, layers.Rescaling)):
            nxt = only_consumer(name)
            plan[name] = ("copy", None, not (nxt is not None and _fusable_activation(nxt)))
        elif isinstance(layer, layers.UpSampling2D):
            plan[name] = ("copy", None, layer.interpolation != "nearest")
        elif isinstance(layer, layers.Activation):
            plan[name] = ("copy", None, _activation_name(layer) not in ("linear", "softmax"))
        else:
            plan[name] = ("copy", None, isinstance(layer, _NEW_SCALE))
    for name in folded:
        plan[name] = ("identity", None, False)
    return plan, calls


def quantize_model(model, skip_layers=(), fold_batch_norm=True, range_decay=0.99):
    """Returns a QAT copy of `model` with int8 fake quantization the TFLite converter reads.

    Weights are symmetric int8 (per channel for convolutions, per tensor for Dense);
    activations are asymmetric int8 with moving-average ranges (the first training batch sets
    them; `FreezeQuantization` stops them). BatchNormalization after a conv/Dense is folded
    into it. The float model is not modified. Compile the result before training.

    Args:
        model: a built functional or Sequential Keras 3 model; its weighted layers may be
            wrapped by the pruning wrapper (masks are kept and applied after BN folding).
            Prune + QAT in one fit: `qat = quantize_model(prune(model, schedule))`, fit with
            `PruningCallback()` and `FreezeQuantization(...)`, then `strip(qat)` (a smaller
            QAT model, exact) and convert without representative data.
        skip_layers: names of layers to leave in float (convert with float fallback allowed).
        fold_batch_norm: fold BatchNormalization into the preceding conv/Dense.
        range_decay: moving-average decay of the activation ranges, per training step.

    Returns:
        A new functional `keras.Model`.

    Raises:
        UnsupportedLayerError: a layer has no int8 treatment; the message lists them all.
        InputError: `model` is not a built functional/Sequential model, or `skip_layers`
            names a layer that does not exist.

    Example:
        >>> qat = quantize_model(model, skip_layers=["lstm"])
    """
    functional = _as_functional(model)
    if any(isinstance(layer, (QuantizeWrapper, ActivationQuantizer))
           for layer in functional.layers):
        raise InputError(f"model is already quantized. Received: model={functional.name}")
    names = [layer.name for layer in functional.layers]
    skip = set([skip_layers] if isinstance(skip_layers, str) else skip_layers)
    missing = sorted(skip - set(names))
    if missing:
        raise InputError(f"skip_layers names layers that are not in the model (layers: "
                         f"{names}). Received: skip_layers={missing}")
    bad = [(layer.name, _unsupported_reason(layer)) for layer in functional.layers
           if layer.name not in skip and _unsupported_reason(layer) is not None]
    if bad:
        listed = ", ".join(f"'{n}' ({why})" for n, why in bad)
        raise UnsupportedLayerError(
            f"quantize_model cannot quantize {len(bad)} layer(s): {listed}. Leave them in "
            f"float with quantize_model(model, skip_layers={[n for n, _ in bad]}) and convert "
            "with float fallback allowed. Received: model=" + functional.name)
    plan, calls = _plan(functional, skip, fold_batch_norm)
    shared = sorted(n for n, c in calls.items() if c > 1 and n in plan)
    if shared:
        raise UnsupportedLayerError(
            f"quantize_model cannot quantize layers called more than once (shared weights). "
            f"Received: shared layers {shared}")
    by_name = {layer.name: layer for layer in functional.layers}
    return _rebuild(functional, plan, by_name, range_decay)


def _copy_layer(layer):
    return keras.layers.deserialize(keras.layers.serialize(layer))


def _rebuild(functional, plan, by_name, decay):
    input_structure = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name), functional.input)
    new_inputs = keras.tree.flatten(input_structure)
    quantized_inputs = {}  # id(input tensor) -> its quantized version, one quantizer each

    def quantize_inputs(value):
        for i, tensor in enumerate(new_inputs):
            if value is tensor:
                if id(tensor) not in quantized_inputs:
                    quantized_inputs[id(tensor)] = ActivationQuantizer(
                        decay=decay, initial_range=(0.0, 1.0),
                        name=f"{functional.inputs[i].name}_quant")(tensor)
                return quantized_inputs[id(tensor)]
        return value

    def call_function(layer, *args, **kwargs):
        args = keras.tree.map_structure(quantize_inputs, args)
        kwargs = keras.tree.map_structure(quantize_inputs, kwargs)
        action, bn_name, quantize_output = plan[layer.name]
        if action == "identity":
            return args[0]
        if action == "wrap":
            bn = _copy_layer(by_name[bn_name]) if bn_name else None
            new = QuantizeWrapper(_copy_layer(layer), batch_norm=bn, name=f"quant_{layer.name}")
            # Only the tensor: BN's `mask=None` etc. mean nothing to the wrapper.
            outputs = new(args[0])
            new.layer.set_weights(layer.get_weights())
            if bn is not None:
                bn.set_weights(by_name[bn_name].get_weights())
        else:
            new = _copy_layer(layer)
            outputs = new(*args, **kwargs)
            new.set_weights(layer.get_weights())
        if quantize_output:
            outputs = ActivationQuantizer(decay=decay, name=f"{layer.name}_act")(outputs)
        return outputs

    qat = keras.models.clone_model(functional, input_tensors=input_structure,
                                   clone_function=lambda layer: layer,
                                   call_function=call_function)
    return qat


def calibrate(qat_model, data, batch_size=32, steps=None):
    """Sets activation ranges from data before any training (optional).

    Runs training-mode forward passes with BN statistics frozen, so only the range observers
    move (the first batch sets each range, later ones average in).

    Args:
        qat_model: a model returned by `quantize_model`.
        data: a numpy array of inputs (or a list of arrays for several inputs).
        batch_size: samples per forward pass.
        steps: at most this many batches (default: all).
    """
    from tflite_ext.quantization.callbacks import set_observing

    set_observing(qat_model, ranges=True, batch_norm=False)
    first = data[0] if isinstance(data, (list, tuple)) else data
    count = len(first)
    for step, start in enumerate(range(0, count, batch_size)):
        if steps is not None and step >= steps:
            break
        batch = keras.tree.map_structure(lambda a: a[start:start + batch_size], data)
        qat_model(batch, training=True)
    set_observing(qat_model, ranges=True, batch_norm=True)
    return qat_model
