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

Known TensorFlow bug (not in tflite_ext): in TF 2.21 (bundled oneDNN 3.7.3) on x86-64, the oneDNN
CPU kernel for the filter gradient of a 1x1 Conv2D with stride > 1 and fewer than 16 input
channels writes past its workspace (uxlfoundation/oneDNN#6035): `fit` on some batch sizes
(e.g. 9) dies with "double free or corruption" or a segfault. Stripping a ResNet's projection
shortcut to 8 input channels creates exactly that layer, so `strip` warns when its result has
one; set TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported to train such a model.
"""
import os
import platform
import warnings

import keras
import numpy as np

from tflite_ext.errors import InputError
from tflite_ext.graph import DependencyGraph, unwrap
from tflite_ext.pruning.api import prune_wrapper_of
from tflite_ext.pruning.rebuild import clone_layer, rebuild, unique_names
from tflite_ext.pruning.removal import dead_flow, join_offsets, repeated_relus
from tflite_ext.pruning.wrapper import masked_kernel
from tflite_ext.quantization.wrapper import QuantizeWrapper


def _group_keep(graph):
    """{group id: bool keep array}: a channel goes only if every consumer ignores it."""
    keeps = {}
    for group in graph.groups:
        consumers = [prune_wrapper_of(graph.node_by_name[name].layer)
                     for name, _, _ in group.consumers]
        if any(w is None or w.granularity != "channel" for w in consumers):
            continue
        keep = np.zeros(group.size, bool)
        if consumers:
            for (name, fidx, cidx), wrapper in zip(group.consumers, consumers):
                keep[cidx] |= keras.ops.convert_to_numpy(wrapper.in_mask)[fidx] > 0
        else:
            for name in group.producers:
                node = graph.node_by_name[name]
                wrapper = prune_wrapper_of(node.layer)
                if wrapper is None:
                    keep[:] = True
                    continue
                for root, fidx, cidx in graph.index_of(node.outputs[0]):
                    if root == group.id:
                        keep[cidx] |= keras.ops.convert_to_numpy(wrapper.out_mask)[fidx] > 0
        if not keep.all():  # all-False: the group is removed (group_sparsity 1.0; removal.py)
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


def _sliced_like(source, base, out_keep, name):
    """A `QuantizeWrapper` like `source` around the sliced `base`, its folded BN sliced too.

    Exact: pruned channels were zeroed in the QAT model's kernels and bias (after folding), so
    per-channel weight ranges, the per-tensor Dense range and every activation range (which
    always holds 0) are unchanged by removing them. Ranges and observer states are copied.
    """
    bn, bn_weights = source.batch_norm, None
    if bn is not None:
        bn_weights = [w[out_keep] if w.ndim and w.shape[-1] == out_keep.size else w
                      for w in bn.get_weights()]
        bn = clone_layer(bn)
    wrapper = QuantizeWrapper(base, batch_norm=bn, name=name)

    def init(new, base_weights):
        new.layer.set_weights([base_weights[v.name] for v in new.layer.weights])
        if bn is not None:
            new.batch_norm.set_weights(bn_weights)
        new.bn_observing.assign(source.bn_observing)
        for mine, theirs in ((new.mid_quantizer, source.mid_quantizer),
                             (new.logits_quantizer, source.logits_quantizer)):
            if mine is not None:
                mine.set_weights(theirs.get_weights())
    return wrapper, init


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
            and TF_ENABLE_ONEDNN_OPTS is not 0: fitting it can crash (see the module note).

    Example:
        >>> small = strip(pruned)
        >>> small.count_params() < pruned.count_params()
        True
        >>> small_qat = strip(qat)            # qat = quantize_model(pruned), trained
        >>> flatbuffer = convert.to_tflite(small_qat).flatbuffer
    """
    graph = DependencyGraph(model)
    if not any(prune_wrapper_of(n.layer) is not None for n in graph.nodes):
        raise InputError("strip() needs a model returned by prune(); this one has no pruning "
                         f"wrappers. Received: model={model.name}")
    keeps = _group_keep(graph)
    names = unique_names(graph)
    empty, constant, joins = dead_flow(graph, keeps)
    if joins and any(isinstance(n.layer, QuantizeWrapper) for n in graph.nodes):
        raise InputError("A QAT model cannot lose a whole residual branch (group_sparsity 1.0): "
                         "strip the pruned float model first, then quantize_model() it. "
                         f"Received: model={model.name}")
    offsets = join_offsets(graph, keeps, constant, joins)
    dropped = set(empty) | set(constant)
    silent = {name: live for name, live in joins.items() if not np.any(offsets[name])}
    repeated = repeated_relus(graph, silent)

    def make_layer(node):
        source = node.layer
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
        pruner, inner = prune_wrapper_of(source), unwrap(source)
        weights = {v.name: keras.ops.convert_to_numpy(v) for v in inner.weights}
        if pruner is not None and pruner.granularity != "channel":
            kernel = masked_kernel(inner)
            weights[kernel.name] = (keras.ops.convert_to_numpy(kernel)
                                    * keras.ops.convert_to_numpy(pruner.weight_mask))
        config = inner.get_config()
        if not isinstance(source, QuantizeWrapper):
            config["name"] = names[node.name]
        in_keep = graph.keep_mask(node.inputs[0], keeps)
        out_keep = graph.keep_mask(node.outputs[0], keeps)
        if node.kind == "producer":
            config, weights = _slice_producer(config, weights, in_keep, out_keep)
        elif node.kind in ("pass_through", "flatten") and (not in_keep.all() or
                                                           not out_keep.all()):
            config, weights = _slice_per_channel(config, weights, in_keep, out_keep)
        layer = clone_layer(inner, config)
        if isinstance(source, QuantizeWrapper):
            wrapper, init_wrapper = _sliced_like(source, layer, out_keep, names[node.name])
            return wrapper, lambda new: init_wrapper(new, weights)

        def init(new):
            new.set_weights([weights[v.name] for v in new.weights])
        return layer, init if weights else None

    small = rebuild(graph, make_layer)
    _warn_if_onednn_crashes(small)
    return small


def _onednn_crashing_convs(model):
    """Names of Conv2D layers that hit uxlfoundation/oneDNN#6035 when trained with oneDNN.

    The bug is in oneDNN's 1x1 backward-weights kernel for strided NHWC input when the input
    channels are fewer than its channel block (16 with AVX-512, the case reproduced here).
    """
    names = []
    for layer in model.layers:
        conv = unwrap(layer)
        if (isinstance(conv, keras.layers.Conv2D) and conv.groups == 1
                and all(k == 1 for k in conv.kernel_size) and any(s > 1 for s in conv.strides)
                and conv.kernel.shape[-2] < 16):
            names.append(conv.name)
    return names


def _warn_if_onednn_crashes(model):
    # oneDNN is TF's default on x86-64. TF reads the variable once, at import, so a value set
    # after importing TensorFlow is seen here but too late for TF (then no warning, still a crash).
    onednn_off = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false")
    if (keras.backend.backend() != "tensorflow" or onednn_off
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return
    names = _onednn_crashing_convs(model)
    if names:
        warnings.warn(
            f"strip() left strided 1x1 Conv2D layers with fewer than 16 input channels "
            f"({', '.join(names)}): training them with TensorFlow's oneDNN CPU kernels can "
            "crash the process (uxlfoundation/oneDNN#6035); set TF_ENABLE_ONEDNN_OPTS=0 "
            "before importing TensorFlow to fit this model.", RuntimeWarning, stacklevel=3)
