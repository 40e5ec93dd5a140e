"""`PruningPlan`: which masks a pruned model's groups set, and the masks themselves.

The plan is computed once per model (from its dependency graph, `graph_of`): the groups every
wrapper of the model prunes, where each group's channels sit in each wrapper's input and
output masks, and the per-group sparsity overrides. `apply(sparsity)` scores the channels
with the importance criterion, chooses the kept ones (`select_channels`) and writes every
mask; `PruningCallback` calls it on the schedule's pruning steps. `magnitude_mask` and
`n_m_mask` are the element-wise masks of unstructured and 2:4 pruning.

Example:
    >>> pruned = prune(model, 0.5)
    >>> PruningPlan(pruned).apply(0.5)          # masks as a callback's pruning step sets them
    >>> small = strip(pruned)
"""
import re

import keras
import numpy as np

from tflite_ext import wrapping
from tflite_ext.errors import InputError
from tflite_ext.pruning import importance as importance_lib
from tflite_ext.pruning import removal
from tflite_ext.pruning.graph import graph_of
from tflite_ext.pruning.wrapper import PruneWrapper


def group_members(group):
    """Names of the layers whose output channels are `group`: its producers (Conv/Dense) and
    carriers (BatchNormalization, depthwise convs). Not its consumers, whose *outputs*
    belong to other groups."""
    return list(group.producers) + [name for name, _, _ in group.carriers]


def group_overrides(groups, group_sparsity, names=None):
    """{group id: sparsity} from `{layer-name regex: sparsity}`.

    A group takes the value of the first pattern (in dict order) that full-matches the name
    of any of its `group_members` (renamed through `names`, {node name: layer name}, if
    given); groups no pattern matches are absent.
    """
    patterns = [(re.compile(p), v) for p, v in (group_sparsity or {}).items()]
    overrides = {}
    for group in groups:
        members = [names[m] if names else m for m in group_members(group)]
        for regex, value in patterns:
            if any(regex.fullmatch(name) for name in members):
                overrides[group.id] = float(value)
                break
    return overrides


def pruning_wrappers(model):
    """The `PruneWrapper` layers of a model in model order, also inside other wrappers
    (QAT) and nested models.

    Example:
        >>> len(pruning_wrappers(quantize_model(prune(model))))
        4
    """
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(pruning_wrappers(layer))
        elif wrapping.find(layer, PruneWrapper) is not None:
            found.append(wrapping.find(layer, PruneWrapper))
    return found


def get_schedule_and_policy(model):
    """(schedule, policy) stored in the first wrapper of a pruned model."""
    wrappers = pruning_wrappers(model)
    if not wrappers:
        raise InputError("The model has no pruning wrappers; call tflite_ext.pruning.prune() "
                         f"first. Received: model={model.name}")
    return wrappers[0].schedule, wrappers[0].policy


def magnitude_mask(weights, sparsity):
    """Element-wise mask keeping the largest-|w| (1 - sparsity) fraction of `weights`."""
    flat = np.abs(weights).ravel()
    n_prune = int(np.floor(sparsity * flat.size))
    mask = np.ones(flat.size, np.float32)
    if n_prune:
        mask[np.argsort(flat, kind="stable")[:n_prune]] = 0.0
    return mask.reshape(weights.shape)


def n_m_mask(weights, n=2, m=4, axis=-2):
    """N:M mask: in every run of `m` weights along `axis` (the input axis), keep the `n`
    largest by magnitude (2:4 is the pattern sparse tensor cores accelerate)."""
    w = np.moveaxis(np.abs(weights), axis, -1)
    size = w.shape[-1]
    pad = (-size) % m
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)], constant_values=np.inf)
    runs = w.reshape(w.shape[:-1] + (-1, m))
    order = np.argsort(-runs, axis=-1, kind="stable")
    mask = np.zeros_like(runs, np.float32)
    np.put_along_axis(mask, order[..., :n], 1.0, axis=-1)
    mask = mask.reshape(w.shape)[..., :size]
    return np.moveaxis(mask, -1, axis)


class PruningPlan:
    """Which masks to set from which groups, computed once per model."""

    def __init__(self, model, importance=None):
        self.model = model
        self.schedule, self.policy = get_schedule_and_policy(model)
        stored = getattr(pruning_wrappers(model)[0], "tflite_ext_importance", None)
        self.importance = importance_lib.get(importance or stored
                                             or self.policy.get("importance", "l2"))
        self.graph = graph_of(model)
        # A node's PruneWrapper may sit inside a QuantizeWrapper (prune + QAT in one fit).
        found = [(n, wrapping.find(n.layer, PruneWrapper)) for n in self.graph.nodes]
        found = [(n, w) for n, w in found if w is not None]
        self.wrappers = [w for _, w in found]
        self.elementwise = [w for _, w in found if w.granularity != "channel"]
        channel = {n.name: n for n, w in found if w.granularity == "channel"}
        self._wrapper = {n.name: w for n, w in found}
        self.groups = [g for g in self.graph.groups
                       if g.producers and all(p in channel for p in g.producers)
                       and all(c in channel for c, _, _ in g.consumers)]
        ids = {g.id for g in self.groups}
        self.assign = []  # (wrapper, [(group, fidx, cidx)] in, same out)
        for name, node in channel.items():
            ins = [r for r in self.graph.index_of(node.inputs[0]) if r[0] in ids]
            outs = [r for r in self.graph.index_of(node.outputs[0]) if r[0] in ids]
            if ins or outs:
                self.assign.append((self._wrapper[name], ins, outs))
        self.producer_of = {g.id: channel[g.producers[0]] for g in self.groups}
        # {group id: final sparsity} from prune(group_sparsity=...); ramped in apply().
        self.overrides = group_overrides(self.groups, self.policy.get("group_sparsity"))
        self.reload()

    def reload(self):
        """Re-reads what the plan derives from the masks (which branches are removed), after
        they were restored from a file (e.g. a resumed model)."""
        keeps = {g.id: self._current_keep(g) for g in self.groups}
        self._removed = removal.removed_branches(self.graph, keeps)

    def settle(self):
        """Puts back what an optimizer step moved: masked weights to zero (unstructured, 2:4,
        so predict and evaluate between batches see the sparse kernel), and removed branches
        silenced and settled (see `removal`; Adam's momentum keeps moving their biases and
        BN offsets). The callback calls this after every batch."""
        for wrapper in self.elementwise:
            kernel = wrapper.masked_kernel
            kernel.assign(kernel * wrapper.weight_mask)
        if self._removed is not None:
            removal.settle_removed_branches(self.graph, self._removed)

    def step(self):
        if not self.wrappers:
            return 0
        return int(keras.ops.convert_to_numpy(self.wrappers[0].pruning_step))

    def _current_keep(self, group):
        node = self.producer_of[group.id]
        keep = np.ones(group.size, bool)
        mask = keras.ops.convert_to_numpy(self._wrapper[node.name].out_mask) > 0
        for root, fidx, cidx in self.graph.index_of(node.outputs[0]):
            if root == group.id:
                keep[cidx] = mask[fidx]
        return keep

    def _gradients(self, data):
        import tensorflow as tf  # the TF backend is what this project converts from

        if data is None:
            raise InputError("Taylor importance needs a batch: PruningCallback(data=(x, y)). "
                             "Received: data=None")
        x, y = data
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        grads = tape.gradient(loss, variables)
        return {v.path: np.asarray(g) for v, g in zip(variables, grads) if g is not None}

    def apply(self, sparsity, data=None):
        """Recomputes every mask for `sparsity`; masked channels stay masked."""
        if self.groups:
            grads = self._gradients(data) if self.importance.needs_gradients else None
            ctx = importance_lib.Context(self.graph, grads)
            scores, sizes = {}, {}
            for group in self.groups:
                s = np.asarray(self.importance(ctx, group), np.float64)
                scores[group.id] = np.where(self._current_keep(group), s, -np.inf)
                sizes[group.id] = group.size
            p = self.policy
            per_group = None
            if self.overrides:
                # Ratio first: at the schedule's end it is exactly 1.0, so groups reach
                # exactly their override.
                ramp = sparsity / self.schedule.final_sparsity
                per_group = {g: v * ramp for g, v in self.overrides.items()}
            keeps = importance_lib.select_channels(
                scores, sizes, sparsity, p.get("scope", "local"), p.get("min_channels", 1),
                p.get("round_to", 1), group_sparsity=per_group)
            for wrapper, ins, outs in self.assign:
                for variable, refs in ((wrapper.in_mask, ins), (wrapper.out_mask, outs)):
                    mask = np.ones(variable.shape, np.float32)
                    for root, fidx, cidx in refs:
                        mask[fidx] = keeps[root][cidx]
                    variable.assign(mask)
                if wrapper.track_activations:  # statistics restart for the next interval
                    for v in (wrapper.act_abs_sum, wrapper.act_zero_sum, wrapper.act_count):
                        v.assign(np.zeros(v.shape, np.float32))
            self._removed = removal.removed_branches(self.graph, keeps)
            self.settle()
        for wrapper in self.elementwise:
            kernel = wrapper.masked_kernel
            values = keras.ops.convert_to_numpy(kernel)
            if wrapper.granularity == "2:4":
                mask = n_m_mask(values, axis=wrapper.masked_axis)
            else:
                mask = magnitude_mask(values, sparsity)
            wrapper.weight_mask.assign(mask)
            kernel.assign(values * mask)
