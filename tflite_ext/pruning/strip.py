"""`strip(model)`: an ordinary Keras model with the masked channels physically removed.

The model is rebuilt node by node: producers (Conv/Dense/SeparableConv) get fewer filters or
units and sliced kernels, per-channel layers (BatchNormalization, depthwise conv, PReLU) get
sliced weights, Reshape targets follow the new widths, and Concatenate/Flatten need nothing:
their new widths follow from their inputs. Element-wise (unstructured, 2:4) masks are baked
into the kernels. The result computes what the masked model computes (to float rounding).

Example:
    >>> small = strip(pruned)
    >>> np.abs(small.predict(x) - pruned.predict(x)).max() < 1e-5
    True
"""
import keras
import numpy as np

from tflite_ext.errors import InputError
from tflite_ext.graph import DependencyGraph
from tflite_ext.pruning.rebuild import clone_layer, rebuild, unique_names
from tflite_ext.pruning.wrapper import PruneWrapper, masked_kernel


def _group_keep(graph):
    """{group id: bool keep array}: a channel goes only if every consumer ignores it."""
    keeps = {}
    for group in graph.groups:
        consumers = [graph.node_by_name[name] for name, _, _ in group.consumers]
        if any(not isinstance(n.layer, PruneWrapper) or n.layer.granularity != "channel"
               for n in consumers):
            continue
        keep = np.zeros(group.size, bool)
        if consumers:
            for (name, fidx, cidx), node in zip(group.consumers, consumers):
                keep[cidx] |= keras.ops.convert_to_numpy(node.layer.in_mask)[fidx] > 0
        else:
            for name in group.producers:
                node = graph.node_by_name[name]
                if not isinstance(node.layer, PruneWrapper):
                    keep[:] = True
                    continue
                for root, fidx, cidx in graph.index_of(node.outputs[0]):
                    if root == group.id:
                        keep[cidx] |= keras.ops.convert_to_numpy(node.layer.out_mask)[fidx] > 0
        if not keep.any():
            keep[0] = True  # a layer needs one channel; min_channels >= 1 avoids this anyway
        if not keep.all():
            keeps[group.id] = keep
    return keeps


def _take(array, keep, axis):
    return np.take(array, np.nonzero(keep)[0], axis=axis)


def _slice_producer(config, weights, in_keep, out_keep):
    width = int(out_keep.sum())
    config["units" if "units" in config else "filters"] = width
    out = {}
    for name, w in weights.items():
        if name in ("kernel", "depthwise_kernel"):
            w = _take(w, in_keep, -2)
            if name == "kernel":
                w = _take(w, out_keep, -1)
        elif name == "pointwise_kernel":
            mult = w.shape[-2] // in_keep.size
            w = _take(_take(w, np.repeat(in_keep, mult), -2), out_keep, -1)
        elif name == "bias":
            w = w[out_keep]
        out[name] = w
    return config, out


def _slice_per_channel(config, weights, in_keep, out_keep):
    if "target_shape" in config:  # Reshape that keeps the channel axis last, or flattens
        target = list(config["target_shape"])
        target[-1] = int(out_keep.sum())
        config["target_shape"] = tuple(target)
    out = {}
    for name, w in weights.items():
        if name == "kernel" and w.ndim >= 3:  # depthwise kernel (..., C, multiplier)
            w = _take(w, in_keep, -2)
        elif w.ndim and w.shape[-1] == in_keep.size:
            w = _take(w, in_keep, -1)
        out[name] = w
    return config, out


def strip(model):
    """Returns an ordinary Keras functional model: no wrappers, masked channels removed.

    Args:
        model: a model returned by `prune` (trained with `PruningCallback`), or one loaded
            from `.keras`.

    Raises:
        InputError: the model has no pruning wrappers (it was never pruned).

    Example:
        >>> small = strip(pruned)
        >>> small.count_params() < pruned.count_params()
        True
    """
    graph = DependencyGraph(model)
    if not any(isinstance(n.layer, PruneWrapper) for n in graph.nodes):
        raise InputError("strip() needs a model returned by prune(); this one has no pruning "
                         f"wrappers. Received: model={model.name}")
    keeps = _group_keep(graph)
    names = unique_names(graph)

    def make_layer(node):
        source = node.layer
        inner = source.layer if isinstance(source, PruneWrapper) else source
        weights = {v.name: keras.ops.convert_to_numpy(v) for v in inner.weights}
        if isinstance(source, PruneWrapper) and source.granularity != "channel":
            kernel = masked_kernel(inner)
            weights[kernel.name] = keras.ops.convert_to_numpy(kernel) * keras.ops.convert_to_numpy(source.weight_mask)
        config = inner.get_config()
        config["name"] = names[node.name]
        in_keep = graph.keep_mask(node.inputs[0], keeps)
        out_keep = graph.keep_mask(node.outputs[0], keeps)
        if node.kind == "producer":
            config, weights = _slice_producer(config, weights, in_keep, out_keep)
        elif node.kind in ("pass_through", "flatten") and (not in_keep.all() or
                                                           not out_keep.all()):
            config, weights = _slice_per_channel(config, weights, in_keep, out_keep)
        layer = clone_layer(inner, config)

        def init(new):
            new.set_weights([weights[v.name] for v in new.weights])
        return layer, init if weights else None

    return rebuild(graph, make_layer)
