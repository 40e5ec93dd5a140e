"""`quantize_model`: quantization-aware training for Keras 3 functional and Sequential models.

The model is rebuilt node by node (the walk and rebuild of `tflite_ext.functional`, the same
that `prune` and `strip` use; nested models come out flattened): weighted layers go into a
`QuantizeWrapper` (fake-quantized kernels, following BN folded in), and an
`ActivationQuantizer` is placed wherever the int8 graph gets a new scale: the model inputs
and the outputs of convolutions, Dense, Add, Concatenate, activations and global average
pooling. A conv or Add whose only consumer is a ReLU/ReLU6 gets no quantizer of its own
(TFLite fuses the activation, so only the activated tensor exists in int8). Layers that keep
their input scale in TFLite (pooling, reshape, flatten, padding, cropping, nearest
upsampling, dropout) and Softmax (fixed 1/256 output scale) get none. Which layer is which
is its handler's knowledge (`Handler.qat` in `pruning.handlers`).

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

from tflite_ext import wrapping
from tflite_ext.errors import InputError, UnsupportedLayerError
from tflite_ext.functional import FunctionalGraph, clone_layer, rebuild, unique_names
from tflite_ext.onednn import warn_if_training_crashes
from tflite_ext.pruning.handlers import FIXED_SCALE_ACTIVATIONS, activation_name, handler_for
from tflite_ext.quantization.quantizers import ActivationQuantizer
from tflite_ext.quantization.wrapper import KINDS, QuantizeWrapper


def _action(node):
    """The node's QAT action (`Handler.qat`), or raises UnsupportedLayerError(reason)."""
    base = wrapping.unwrap(node.layer)
    handler = handler_for(base)
    if handler is None:
        op = "" if isinstance(base, keras.layers.Layer) else " op, an expression such as x * c"
        raise UnsupportedLayerError(f"{type(base).__name__}{op}")
    return handler.qat(base)


def _fuses(node):
    handler = node is not None and handler_for(node.layer)
    return bool(handler) and handler.fuses(wrapping.unwrap(node.layer))


def _plan(graph, actions, skip, fold_batch_norm):
    """{node name: (what, folded BN node name, quantize the output?)}; `what` is "wrap",
    "copy" or "identity" (a BatchNormalization folded into the layer before it). `skip`
    holds the names of the nodes left in float."""
    consumers = graph.consumers()
    calls = collections.Counter(id(node.layer) for node in graph.nodes)

    def only_consumer(node):
        found = consumers.get(node.outputs[0], [])
        return found[0] if len(found) == 1 and node.outputs[0] not in graph.outputs else None

    plan, folded = {}, set()
    for node in graph.nodes:
        layer = node.layer
        if not node.inputs:
            plan[node.name] = ("input", None, True)
        elif node.name in skip:
            plan[node.name] = ("copy", None, True)
        elif actions[node.name] in KINDS:
            bn = only_consumer(node)
            base = wrapping.unwrap(layer)
            act = activation_name(base)
            foldable = (fold_batch_norm and bn is not None
                        and isinstance(bn.layer, layers.BatchNormalization)
                        and not isinstance(base, layers.BatchNormalization)
                        and bn.name not in skip and calls[id(bn.layer)] == 1
                        and bn.layer.axis in (-1, len(bn.layer.input.shape) - 1)
                        and act == "linear")
            bn = bn if foldable else None
            if bn is not None:
                folded.add(bn.name)
            fuse = act == "linear" and _fuses(only_consumer(bn or node))
            fixed = act in FIXED_SCALE_ACTIVATIONS  # the int8 op sets its own output scale
            plan[node.name] = ("wrap", bn.name if bn else None, not fuse and not fixed)
        elif actions[node.name] == "fused_output":
            plan[node.name] = ("copy", None, not _fuses(only_consumer(node)))
        else:
            plan[node.name] = ("copy", None, actions[node.name] == "output")
    for name in folded:
        plan[name] = ("identity", None, False)
    return plan


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
    graph = FunctionalGraph(model)
    nodes = [node for node in graph.nodes if node.inputs]
    if any(isinstance(n.layer, (QuantizeWrapper, ActivationQuantizer)) for n in nodes):
        raise InputError(f"model is already quantized. Received: model={graph.name}")
    names = [node.layer.name for node in nodes]
    skip = set([skip_layers] if isinstance(skip_layers, str) else skip_layers)
    # A nested model's name skips every layer in it (nested models come out flattened).
    nested = {part for node in nodes for part in node.name.split("/")[:-1]}
    missing = sorted(skip - set(names) - nested)
    if missing:
        raise InputError(f"skip_layers names layers that are not in the model (layers: "
                         f"{names}). Received: skip_layers={missing}")
    skip = {node.name for node in nodes
            if node.layer.name in skip or skip & set(node.name.split("/")[:-1])}
    actions, bad = {}, []
    for node in nodes:
        if node.name in skip:
            continue
        try:
            actions[node.name] = _action(node)
        except UnsupportedLayerError as reason:
            bad.append((node.layer.name, str(reason)))
    if bad:
        listed = ", ".join(f"'{n}' ({why})" for n, why in bad)
        raise UnsupportedLayerError(
            f"quantize_model cannot quantize {len(bad)} layer(s): {listed}. Leave them in "
            f"float with quantize_model(model, skip_layers={[n for n, _ in bad]}) and convert "
            "with float fallback allowed. Received: model=" + graph.name)
    calls = collections.Counter(id(node.layer) for node in nodes)
    shared = sorted({node.layer.name for node in nodes if calls[id(node.layer)] > 1})
    if shared:
        raise UnsupportedLayerError(
            f"quantize_model cannot quantize layers called more than once (shared weights). "
            f"Received: shared layers {shared}")
    plan = _plan(graph, actions, skip, fold_batch_norm)
    qat = _rebuild(graph, plan, range_decay)
    warn_if_training_crashes(qat.layers, "quantize_model()")  # it is about to be trained
    return qat


def _copy(layer, name):
    if name == layer.name:
        return clone_layer(layer)
    return clone_layer(layer, {**layer.get_config(), "name": name})


def _rebuild(graph, plan, decay):
    names = unique_names(graph)
    taken = set(names.values())

    def fresh(name):
        """`name`, or with a suffix if a layer of the model has it already (Xception names
        its activations "..._act")."""
        while name in taken:
            name += "_q"
        taken.add(name)
        return name

    def make_layer(node):
        what, bn_name, _ = plan[node.name]
        layer = node.layer
        if what == "identity":
            return None, None, node.inputs[0]
        if what == "copy":
            return _copy(layer, names[node.name]), \
                lambda new: new.set_weights(layer.get_weights())
        bn = graph.node_by_name[bn_name].layer if bn_name else None
        new_bn = _copy(bn, names[bn_name]) if bn is not None else None
        wrapper = QuantizeWrapper(_copy(layer, names[node.name]), batch_norm=new_bn,
                                  name=fresh(f"quant_{names[node.name]}"))

        def init(new):
            new.layer.set_weights(layer.get_weights())
            if bn is not None:
                new.batch_norm.set_weights(bn.get_weights())
        # Only the tensor: a BN's `mask=None` and the like mean nothing to the wrapper.
        return wrapper, init, node.inputs[0]

    def quantize_output(node, tensor):
        if not plan[node.name][2]:
            return tensor
        if not node.inputs:  # a model input: its range starts at [0, 1]
            return ActivationQuantizer(decay=decay, initial_range=(0.0, 1.0),
                                       name=fresh(f"{node.layer.name}_quant"))(tensor)
        return ActivationQuantizer(decay=decay, name=fresh(f"{names[node.name]}_act"))(tensor)

    return rebuild(graph, make_layer, then=quantize_output)


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
        batch = keras.tree.map_structure(lambda a, s=start: a[s:s + batch_size], data)
        qat_model(batch, training=True)
    set_observing(qat_model, ranges=True, batch_norm=True)
    return qat_model
