"""`shared_short_run`: the short runs of many channel changes in one fit, on shared weights.

A damaging change is judged by how it recovers, not by its one-shot loss (a layer pruned by
7/8 is near chance in one shot, recovered or not). One short run per change cost ResNet-8's
`host` search six runs of 11-14 s. Here one pruning-wrapped copy of the model, every mask at
one, is trained once: step i sets the masks of slot i mod n, the slots being the unchanged
model (the reference) and each change in turn, so the weights learn to serve them all (the
weight sharing of slimmable networks, Yu et al. 2019, and AutoSlim, Yu & Huang 2019). Then
each slot's masks are set, BatchNormalization is re-estimated under them, and its validation
accuracy read. The masks are variables: the fit and the evaluation are traced once.

The masks are chosen once, from the trained weights (as the one-shot candidates were); the
score is float, a loss against the reference of the same run, not an int8 accuracy.

Example:
    >>> reference, scores = shared_short_run(model, changes, split, (x_val, y_val),
    ...                                      steps_per_slot=16, learning_rate=1e-3)
    >>> reference - scores[changes[0]]  # the change's loss after the short run
    0.004
"""
import math

import keras

from tflite_ext import pruning
from tflite_ext.bench import variants
from tflite_ext.errors import InputError
from tflite_ext.pruning.plan import PruningPlan, pruning_wrappers
from tflite_ext.pruning.recalibrate import recalibrator


def _masks(wrappers):
    return [(keras.ops.convert_to_numpy(w.in_mask), keras.ops.convert_to_numpy(w.out_mask))
            for w in wrappers]


def channel_masks(model, change, *, layers=None, round_to=8):
    """[(in_mask, out_mask)] of each `PruneWrapper` of `model` pruned (`pruning_wrappers`,
    model order: nested models may repeat layer names) with group `change.key` pruned by
    `change.setting`: the masks `prune` and `PruningPlan.apply` choose."""
    if change.kind != "prune" or not 0 < change.setting < 1:
        raise InputError(f"A shared short run takes channel changes (prune at a sparsity "
                         f"between 0 and 1). Received: {change.label}")
    pruned = pruning.prune(model, change.setting, layers=layers, round_to=round_to,
                           group_sparsity={change.key: change.setting, ".*": 0.0})
    PruningPlan(pruned).apply(change.setting)
    return _masks(pruning_wrappers(pruned))


class _Rotate(keras.callbacks.Callback):
    """Before step i, the masks of slot i mod len(slots); stops after `steps`."""

    def __init__(self, set_slot, slots, steps):
        super().__init__()
        self.set_slot, self.slots, self.steps, self.step = set_slot, slots, steps, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.set_slot(self.slots[self.step % len(self.slots)])
        self.step += 1

    def on_train_batch_end(self, batch, logs=None):
        if self.step >= self.steps:
            self.model.stop_training = True


def shared_short_run(model, changes, data, val, *, steps_per_slot, learning_rate,
                     layers=None, round_to=8, seed=0, batch_size=32):
    """(reference accuracy, {change: accuracy}) on `val` after one distilled fit (`model`
    teaching) of `steps_per_slot` steps per slot, the slots being the unchanged model and
    each of `changes` (channel changes: `channel_masks`), in turn.

    Args:
        model: the trained float model (it is not changed).
        changes: `search.Change`s of kind "prune" at settings below 1.
        data: a `tasks.Split` to train on; val: (x, y).
        steps_per_slot: optimizer steps each slot gets.
    """
    slots = [channel_masks(model, c, layers=layers, round_to=round_to) for c in changes]
    shared = pruning.prune(model, 0.5, layers=layers, round_to=round_to)  # every mask at one
    wrappers = pruning_wrappers(shared)  # the same layers in the same order as each slot's
    slots.insert(0, _masks(wrappers))

    def set_slot(masks):
        for wrapper, (in_mask, out_mask) in zip(wrappers, masks, strict=True):
            wrapper.in_mask.assign(in_mask)
            wrapper.out_mask.assign(out_mask)

    steps = steps_per_slot * len(slots)
    per_epoch = math.ceil(len(data.x_train) / batch_size)
    keras.utils.set_random_seed(seed)
    variants.fit(shared, data, epochs=math.ceil(steps / per_epoch), learning_rate=learning_rate,
                 batch_size=batch_size, teacher=model,
                 callbacks=[_Rotate(set_slot, slots, steps)])
    # 512 images in batches of 128, as the one-shot candidates are re-estimated: each pass is
    # a forward of the whole sample (ResNet-8: 0.46 s on all 1,005 training images)
    recalibrate, scores = recalibrator(shared, data.x_train[:512], batch_size=128), []
    for masks in slots:
        set_slot(masks)
        recalibrate()
        scores.append(variants.accuracy(shared, *val))
    return scores[0], dict(zip(changes, scores[1:]))
