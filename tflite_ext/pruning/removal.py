"""Whole residual branches removed: a dependency group pruned to zero channels.

When every channel of a group goes (`prune(..., group_sparsity={regex: 1.0})`), the layers
that consume it get no input, so their output is a constant: their bias, carried through
per-channel layers (BatchNormalization, activations) into a residual `Add`. The pruning
callback then silences the branch: biases and BatchNormalization offsets on it are held at
zero, so the branch adds exactly nothing and the block becomes the identity; `strip` drops
the branch and its `Add`. If a layer on the removed branches turns zero into something else
(a sigmoid), none is silenced: each keeps its constant, and `strip` replaces it by one
element-wise add (`keras.layers.Rescaling(1.0, offset=c)`, a TFLite ADD).

Why it matters: where a small conv's latency is set by its spatial size rather than its
channel count (LiteRT/XNNPACK on AMX CPUs time a 32x32 3x3 conv the same from 4 to 32
channels), removing channels cannot make a high-resolution stage cheaper; removing the block
does. Silencing matters too: on the AMD EPYC of the README, a constant add at 32x32x16 costs
LiteRT 5 us of a 33 us ResNet-8.

Example:
    >>> pruned = prune(models.resnet8(), PolynomialDecay(0.0, 0.6, 0, 400),
    ...                group_sparsity={"s1a_.*": 1.0})   # the first residual block goes
    >>> small = strip(pruned)                # s1a, s1b, s1_add and s1_out's ReLU gone
"""
import collections
import typing

import keras
import numpy as np

from tflite_ext.errors import InputError
from tflite_ext.functional import substitute
from tflite_ext.wrapping import unwrap


def _is_empty(graph, tid, keeps):
    return bool(graph.width(tid)) and not graph.keep_mask(tid, keeps).any()


def _zeros(graph, tid):
    """A batch of one all-zero value of tensor `tid`."""
    return np.zeros((1,) + tuple(graph.shapes[tid][1:]), np.float32)


def _layer_uses(graph):
    """{id(layer): how many nodes call it} (a shared layer becomes one new layer in strip)."""
    return collections.Counter(id(node.layer) for node in graph.nodes)


def dead_flow(graph, keeps):
    """Follows removed groups forward: which nodes vanish, which are constant, which join.

    Args:
        graph: the model's `DependencyGraph`.
        keeps: {group id: bool keep array}; an all-False array marks a removed group.

    Returns:
        (empty, constant, joins): names of nodes whose output has no channels left (dropped);
        names of nodes whose output is a constant (dropped, their value added at the join);
        {Add node name: tensor id of its one live input}.

    Raises:
        InputError: a removed group's constant reaches anything but per-channel layers and an
            `Add` with one live input (a Concatenate, a model output, a Multiply...).
    """
    empty, constant, joins = [], [], {}
    dead_tensors = set()
    uses = _layer_uses(graph)
    for node in graph.nodes:
        if not node.inputs:
            continue
        dead_in = [t in dead_tensors or _is_empty(graph, t, keeps) for t in node.inputs]
        if _is_empty(graph, node.outputs[0], keeps):
            empty.append(node.name)  # e.g. the removed group's own conv, BN and ReLU
        elif not any(dead_in):
            continue
        elif all(dead_in) and node.kind in ("producer", "pass_through", "merge"):
            constant.append(node.name)
        elif isinstance(node.layer, keras.layers.Add) and dead_in.count(False) == 1:
            if uses[id(node.layer)] > 1:  # strip makes one layer per shared layer
                raise InputError(
                    "A group pruned to zero channels (group_sparsity 1.0) must end its residual "
                    f"branch in an Add layer used once; {node.layer.name!r} is called "
                    f"{uses[id(node.layer)]} times. Use a sparsity < 1 for that group.")
            joins[node.name] = node.inputs[dead_in.index(False)]
            continue
        else:
            raise InputError(
                "A group pruned to zero channels (group_sparsity 1.0) must feed only a residual "
                "branch that ends in an Add with one live input (the branch becomes a constant "
                f"add). Its constant reaches layer {node.name!r} ({type(node.layer).__name__}); "
                "use a sparsity < 1 for that group.")
        dead_tensors.update(node.outputs)
    for tid in graph.outputs:
        if tid in dead_tensors:
            raise InputError("A group pruned to zero channels (group_sparsity 1.0) would leave "
                             f"a model output constant. Received: output {tid!r}")
    return empty, constant, joins


def check_removable(graph, group_ids):
    """Raises InputError unless removing every channel of `group_ids` leaves a valid model."""
    by_id = {g.id: g for g in graph.groups}
    keeps = {g: np.zeros(by_id[g].size, bool) for g in group_ids}
    dead_flow(graph, keeps)


def constant_values(graph, keeps, constant, settle=()):
    """{tensor id: value} of the removed branches, on a batch of one.

    Inputs that lost all channels are zeros (the consumers' input masks ignore them anyway),
    so a conv returns its bias everywhere; later constant layers run on those values. A
    BatchNormalization named in `settle` first takes its input as moving mean (variance 0),
    in the same pass, so a BN after it sees the settled value.
    """
    values = {}
    for node in graph.nodes:
        if node.name not in constant:
            continue
        for tid in node.inputs:
            if tid not in values and _is_empty(graph, tid, keeps):
                values[tid] = _zeros(graph, tid)
        if node.name in settle:
            layer = unwrap(node.layer)
            mean = _per_channel(values[node.inputs[0]], node.name).astype(np.float32)
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(np.zeros_like(mean))
        out = node.layer(*substitute(node.args, values), **substitute(node.kwargs, values))
        values[node.outputs[0]] = keras.ops.convert_to_numpy(out)
    return values


def _per_channel(value, where):
    flat = value.reshape(-1, value.shape[-1])
    if not np.allclose(flat, flat[0], rtol=1e-6, atol=1e-6):
        raise InputError(f"The removed branch into {where!r} is not the same at every position "
                         "(e.g. 'valid' padding or a positional layer), so it cannot become a "
                         "constant add; use a sparsity < 1 for that group.")
    return flat[0]


def join_offsets(graph, keeps, constant, joins):
    """{join node name: per-channel offset (kept channels)} that replaces the removed branch."""
    values = constant_values(graph, keeps, constant)
    offsets = {}
    for name, live in joins.items():
        node = graph.node_by_name[name]
        total = sum(values[t] for t in node.inputs if t != live)
        offsets[name] = _per_channel(total, name)[graph.keep_mask(node.outputs[0], keeps)]
    return offsets


def _plain_relu(layer):
    return isinstance(layer, keras.layers.ReLU) and not layer.negative_slope


def repeated_relus(graph, silent_joins):
    """{ReLU node name: its input tensor id} for block-output ReLUs that a silenced branch
    makes redundant.

    `silent_joins` maps each join whose branch adds nothing to its live input. A plain ReLU
    on such a join repeats the same ReLU on the live input (relu(relu(x)) = relu(x)), so
    `strip` drops it: a QAT model would otherwise keep it as a standalone int8 RELU, which
    LiteRT does not hand to XNNPACK (the README's pruned ResNet-8 QAT model: 88.3 us with it,
    28.4 us without).
    """
    producer = {tid: node for node in graph.nodes for tid in node.outputs}
    uses = _layer_uses(graph)
    repeated = {}
    for node in graph.nodes:
        source = producer.get(node.inputs[0]) if node.inputs else None
        if (not _plain_relu(node.layer) or uses[id(node.layer)] > 1  # shared: one new layer
                or source is None or source.name not in silent_joins):
            continue
        while source is not None and source.name in silent_joins:
            source = producer.get(silent_joins[source.name])
        if (source is not None and _plain_relu(source.layer)
                and (source.layer.max_value, source.layer.threshold)
                == (node.layer.max_value, node.layer.threshold)):
            repeated[node.name] = node.inputs[0]
    return repeated


def _zero_maps_to_zero(graph, node):
    """Whether `node` gives exactly zero for all-zero inputs once its biases are zero."""
    layer = unwrap(node.layer)
    if isinstance(layer, keras.layers.BatchNormalization):
        return True  # beta 0 and moving mean = its input: zero in both modes
    if getattr(layer, "activation", None) is not None:  # a producer: bias, then activation
        zero = np.zeros((1,), np.float32)
        return not np.any(keras.ops.convert_to_numpy(layer.activation(zero)))
    zeros = {t: _zeros(graph, t) for t in node.inputs}
    out = node.layer(*substitute(node.args, zeros), **substitute(node.kwargs, zeros))
    return not np.any(keras.ops.convert_to_numpy(out))


class Removed(typing.NamedTuple):
    """What `settle_removed_branches` does after every batch, found once per mask change."""

    keeps: dict  # {group id: keep mask}
    constant: list  # names of the removed branches' nodes
    offsets: list  # biases and BN betas held at zero (empty unless the branches are silenced)
    batch_norms: set  # names of the BN nodes to settle


def removed_branches(graph, keeps):
    """A `Removed` if some group in `keeps` is removed, else None.

    Computed when masks change, so the per-batch `settle_removed_branches` does not re-walk
    the graph. Layers also used on a live path are left alone.
    """
    if all(keep.any() for keep in keeps.values()):
        return None
    _, constant, _ = dead_flow(graph, keeps)
    if not constant:
        return None
    live = {id(node.layer) for node in graph.nodes if node.name not in constant}
    own = [node for node in graph.nodes if node.name in constant and id(node.layer) not in live]
    offsets = []
    # Silenced only if zero biases make every branch add exactly nothing (no sigmoid on it).
    if all(_zero_maps_to_zero(graph, node) for node in graph.nodes if node.name in constant):
        for node in own:
            layer = unwrap(node.layer)
            offset = (layer.beta if isinstance(layer, keras.layers.BatchNormalization)
                      else getattr(layer, "bias", None))
            if offset is not None:
                offsets.append(offset)
    batch_norms = {node.name for node in own
                   if isinstance(unwrap(node.layer), keras.layers.BatchNormalization)}
    return Removed(keeps, constant, offsets, batch_norms)


def settle_removed_branches(graph, removed):
    """Makes removed branches give the same constant in training and inference, and zero if
    they are silenced: then each block becomes the identity, and `strip` drops it with its
    `Add`.

    Each layer on a removed branch sees a constant. Silenced branches get their producers'
    biases and their BatchNormalization offsets (beta) set to zero. BN's moving statistics
    are set to what it now sees (mean: its constant input; variance: 0): in training a BN
    normalizes a constant to exactly `beta`, and inference must agree. The callback calls
    this after every batch, because the optimizer moves those weights again. `removed`
    comes from `removed_branches`.
    """
    for offset in removed.offsets:
        offset.assign(np.zeros(offset.shape, np.float32))
    constant_values(graph, removed.keeps, removed.constant, removed.batch_norms)
