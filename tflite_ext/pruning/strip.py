"""`strip(model)`: an ordinary Keras model with the masked channels physically removed.

The model is rebuilt node by node, and each layer's handler (`pruning.handlers`) slices its
config and weights to the kept channels: producers (Conv/Dense/SeparableConv) get fewer
filters or units, per-channel layers (BatchNormalization, depthwise conv, PReLU) fewer
channels, Reshape targets follow the new widths; Concatenate/Flatten need nothing. Pruning
wrappers go; a QAT wrapper slices itself (`QuantizeWrapper.sliced`). Element-wise
(unstructured, 2:4) masks are baked into the kernels. The result computes what the masked
model computes (to float rounding).

Example:
    >>> small = strip(pruned)
    >>> np.abs(small.predict(x) - pruned.predict(x)).max() < 1e-5
    True

`strip` warns when its result has a layer that crashes TensorFlow's oneDNN training kernels
(`tflite_ext.onednn`).
"""
import keras
import numpy as np

from tflite_ext import wrapping
from tflite_ext.errors import InputError
from tflite_ext.functional import clone_layer, rebuild, unique_names
from tflite_ext.onednn import warn_if_training_crashes
from tflite_ext.pruning.graph import graph_of
from tflite_ext.pruning.handlers import handler_for
from tflite_ext.pruning.removal import dead_flow, join_offsets, repeated_relus
from tflite_ext.pruning.wrapper import PruneWrapper


def _pruner(layer):
    return wrapping.find(layer, PruneWrapper)


def _group_keep(graph):
    """{group id: bool keep array}: a channel goes only if every consumer ignores it."""
    keeps = {}
    for group in graph.groups:
        consumers = [_pruner(graph.node_by_name[name].layer) for name, _, _ in group.consumers]
        if any(w is None or w.granularity != "channel" for w in consumers):
            continue
        keep = np.zeros(group.size, bool)
        if consumers:
            for (_, fidx, cidx), wrapper in zip(group.consumers, consumers):
                keep[cidx] |= keras.ops.convert_to_numpy(wrapper.in_mask)[fidx] > 0
        else:
            for name in group.producers:
                node = graph.node_by_name[name]
                wrapper = _pruner(node.layer)
                if wrapper is None:
                    keep[:] = True
                    continue
                for root, fidx, cidx in graph.index_of(node.outputs[0]):
                    if root == group.id:
                        keep[cidx] |= keras.ops.convert_to_numpy(wrapper.out_mask)[fidx] > 0
        if not keep.all():  # all-False: the group is removed (group_sparsity 1.0; removal.py)
            keeps[group.id] = keep
    return keeps


def _survivors(layer):
    """The wrappers of `layer` that strip keeps (QAT), outermost first."""
    return [w for w in list(wrapping.layers_of(layer))[:-1] if w.survives_strip]


def _stripped_layer(graph, node, keeps, name):
    """(layer, init): the node's layer without pruning, its kept channels only."""
    source = node.layer
    inner, pruner, survivors = wrapping.unwrap(source), _pruner(source), _survivors(source)
    weights = {v.name: keras.ops.convert_to_numpy(v) for v in inner.weights}
    if pruner is not None and pruner.granularity != "channel":  # bake the zeros in
        kernel = pruner.masked_kernel
        weights[kernel.name] = (keras.ops.convert_to_numpy(kernel)
                                * keras.ops.convert_to_numpy(pruner.weight_mask))
    config = inner.get_config()
    if not survivors:  # the layer stands alone: it takes the node's name
        config["name"] = name
    in_keep = graph.keep_mask(node.inputs[0], keeps)
    out_keep = graph.keep_mask(node.outputs[0], keeps)
    if node.kind in ("producer", "pass_through", "flatten") and not (in_keep.all()
                                                                     and out_keep.all()):
        config, weights = handler_for(inner).slice(config, weights, in_keep, out_keep)
    layer = base = clone_layer(inner, config)
    inits = []
    for wrapper in reversed(survivors):  # innermost first: each wraps what is made so far
        layer, init = wrapper.sliced(layer, out_keep, name if wrapper is survivors[0]
                                     else wrapper.name)
        inits.append((layer, init))

    def init(_):
        base.set_weights([weights[v.name] for v in base.weights])
        for made, init_wrapper in inits:
            init_wrapper(made)
    return layer, init if weights or inits else None


def strip(model):
    """Returns an ordinary Keras functional model: no wrappers, masked channels removed.

    A QAT model made from a pruned one (`quantize_model(prune(model))`, trained with
    `PruningCallback`) strips to a smaller QAT model: `QuantizeWrapper`s and activation
    quantizers stay (with their ranges, folded BN and frozen state), only the pruning wrappers
    and the pruned channels go. It computes what the unstripped QAT model computes, and its
    `.tflite` is the unstripped one's minus the zero channels; convert it directly, no
    re-quantization needed.

    Args:
        model: a model returned by `prune` (trained with `PruningCallback`), one loaded
            from `.keras`, or `quantize_model` of such a model.

    A group pruned to zero channels (`group_sparsity` 1.0) takes its residual branch with it:
    the branch's layers and its Add go (the block becomes the identity), or, if the branch
    still adds a constant (a sigmoid on it), the Add becomes `x + constant` (see `removal`).

    Raises:
        InputError: the model has no pruning wrappers (it was never pruned), or a removed
            group's branch cannot become a constant add.

    Warns:
        RuntimeWarning: the result has a strided 1x1 Conv2D with fewer than 16 input channels
            and TF_ENABLE_ONEDNN_OPTS is not 0: fitting it can crash (`tflite_ext.onednn`).

    Example:
        >>> small = strip(pruned)
        >>> small.count_params() < pruned.count_params()
        True
        >>> small_qat = strip(qat)            # qat = quantize_model(pruned), trained
        >>> flatbuffer = convert.to_tflite(small_qat).flatbuffer
    """
    graph = graph_of(model)
    if not any(_pruner(n.layer) is not None for n in graph.nodes):
        raise InputError("strip() needs a model returned by prune(); this one has no pruning "
                         f"wrappers. Received: model={model.name}")
    keeps = _group_keep(graph)
    names = unique_names(graph)
    empty, constant, joins = dead_flow(graph, keeps)
    if joins and any(_survivors(n.layer) for n in graph.nodes):
        raise InputError("A QAT model cannot lose a whole residual branch (group_sparsity 1.0): "
                         "strip the pruned float model first, then quantize_model() it. "
                         f"Received: model={model.name}")
    offsets = join_offsets(graph, keeps, constant, joins)
    dropped = set(empty) | set(constant)
    silent = {name: live for name, live in joins.items() if not np.any(offsets[name])}
    repeated = repeated_relus(graph, silent)

    def make_layer(node):
        if node.name in dropped:
            return None
        passed = silent.get(node.name, repeated.get(node.name))
        if passed is not None:  # the block is the identity; relu(relu(x)) is relu(x)
            if node.outputs[0] in graph.outputs:  # a model output keeps its name
                return keras.layers.Identity(name=names[node.name]), None, passed
            return None, None, passed
        if node.name in joins:  # the removed branch's constant, added to the live input
            offset = [float(v) for v in offsets[node.name]]
            return keras.layers.Rescaling(1.0, offset=offset, name=names[node.name]), None, \
                joins[node.name]
        return _stripped_layer(graph, node, keeps, names[node.name])

    small = rebuild(graph, make_layer)
    warn_if_training_crashes(small.layers, "strip()")
    return small
