"""`PruningCallback`: updates the masks of a pruned model during `fit`, by its schedule.

It does work only on pruning steps (the schedule says when): on other steps it just counts.
The step counter and the masks are model variables, so a model saved to `.keras` mid-pruning
reloads and continues with the same masks and step. It also drives a QAT model made from a
pruned one (`quantize_model(prune(model))`): the masks it sets are folded into the
fake-quantized kernels, so pruned channels are exact zeros in the QAT model and the .tflite.

Example:
    >>> pruned = prune(model, PolynomialDecay(0.0, 0.5, 0, 200, frequency=20))
    >>> pruned.compile(...)
    >>> pruned.fit(x, y, epochs=3, callbacks=[PruningCallback()])
"""
import keras
import numpy as np

from tflite_ext.distillation import student_of
from tflite_ext.errors import InputError
from tflite_ext.graph import DependencyGraph
from tflite_ext.pruning import importance as importance_lib
from tflite_ext.pruning.api import (get_schedule_and_policy, group_overrides, prune_wrapper_of,
                                    pruning_wrappers)
from tflite_ext.pruning import removal
from tflite_ext.pruning.wrapper import masked_kernel


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
        self.graph = DependencyGraph(model)
        # A node's PruneWrapper may sit inside a QuantizeWrapper (prune + QAT in one fit).
        found = [(n, prune_wrapper_of(n.layer)) for n in self.graph.nodes]
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
        keeps = {g.id: self._current_keep(g) for g in self.groups}  # e.g. a resumed model
        self._removed = removal.removed_branches(self.graph, keeps)

    def settle(self):
        """Silences and settles removed branches again (see `removal`): the optimizer keeps
        moving their biases and BN offsets (Adam's momentum), so the callback calls this after
        every batch."""
        if self._removed is not None:
            removal.settle_removed_branches(self.graph, self._removed)

    def step(self):
        return int(keras.ops.convert_to_numpy(self.wrappers[0].pruning_step)) if self.wrappers else 0

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
            kernel = masked_kernel(wrapper.layer)
            values = keras.ops.convert_to_numpy(kernel)
            if wrapper.granularity == "2:4":
                mask = n_m_mask(values)
            else:
                mask = magnitude_mask(values, sparsity)
            wrapper.weight_mask.assign(mask)
            kernel.assign(values * mask)


@keras.saving.register_keras_serializable(package="tflite_ext")
class PruningCallback(keras.callbacks.Callback):
    """Applies the pruning schedule stored in the model's wrappers during `fit`.

    Args:
        importance: override the importance stored by `prune` (name or `Importance`).
        data: `(x, y)` batch for gradient-based importance ("taylor").
        verbose: 1 prints the sparsity at every pruning step.

    Given a `keras.distillation.Distiller` (`distill(teacher, pruned).fit(...)`), it prunes
    the student.

    Example:
        >>> pruned.fit(x, y, epochs=10, callbacks=[PruningCallback()])
    """

    def __init__(self, importance=None, data=None, verbose=0):
        super().__init__()
        self.importance = importance
        self.data = data
        self.verbose = verbose
        self._plan = None
        self._step = 0
        self.history = []  # (step, sparsity) of each pruning step

    def on_train_begin(self, logs=None):
        model = student_of(self.model)  # a Distiller trains its student's layers
        if self._plan is None or self._plan.model is not model:
            self._plan = PruningPlan(model, self.importance)
        self._step = self._plan.step()  # completed steps; wrappers count them in call

    def on_train_batch_begin(self, batch, logs=None):
        # Prune before the first batch too, so step 0 of the schedule is honoured.
        if batch == 0 and self._step == 0 and not self.history:
            self._maybe_prune(0)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._maybe_prune(self._step)
        # The optimizer step moved masked weights off zero: zero them again, so predict and
        # evaluate between and after batches see the sparse kernel.
        for wrapper in self._plan.elementwise:
            kernel = masked_kernel(wrapper.layer)
            kernel.assign(kernel * wrapper.weight_mask)
        self._plan.settle()

    def _maybe_prune(self, step):
        should, sparsity = self._plan.schedule(step)
        if should:
            self._plan.apply(sparsity, self.data)
            self.history.append((step, float(sparsity)))
            if self.verbose:
                print(f"PruningCallback: step {step}, sparsity {sparsity:.3f}")

    def get_config(self):
        return {"importance": self.importance if isinstance(self.importance, str) else None,
                "verbose": self.verbose}
