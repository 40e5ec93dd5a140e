"""Structured pruning for Keras 3 with physical channel removal.

The lifecycle: `prune` wraps layers, `PruningCallback` ramps sparsity during `fit`, `strip`
returns an ordinary Keras model whose masked channels are gone (so the `.tflite` is smaller
and faster). Unstructured and 2:4 pruning use the same wrapper and callback
(`granularity="unstructured"` / `"2:4"`); their `strip` bakes the zeros into the kernels.

Example:
    >>> from tflite_ext import models, pruning, tasks
    >>> data = tasks.digits()
    >>> pruned = pruning.prune(models.digits_cnn(), pruning.PolynomialDecay(0.0, 0.75, 0, 300,
    ...                        frequency=25), round_to=8)
    >>> models.compile_classifier(pruned, 5e-4).fit(data.x_train, data.y_train, epochs=10,
    ...                                            callbacks=[pruning.PruningCallback()])
    >>> small = pruning.strip(pruned)
    >>> pruning.recalibrate_batch_norm(small, data.x_train)   # BN statistics after pruning

`group_sparsity={regex: 1.0}` removes a whole residual branch (`pruning.removal`). A layer
type is known through its handler (`pruning.handlers`); teach a custom one with
`register_handler(MyLayer, PASS_THROUGH)`.
"""
from tflite_ext.pruning import importance
from tflite_ext.pruning import schedules
from tflite_ext.pruning.api import prune
from tflite_ext.pruning.callbacks import PruningCallback
from tflite_ext.pruning.graph import DependencyGraph
from tflite_ext.pruning.handlers import BARRIER, PASS_THROUGH, Handler, register_handler
from tflite_ext.pruning.importance import (APoZ, BNScale, Importance, Magnitude, MeanActivation,
                                           Taylor)
from tflite_ext.pruning.macs import count_macs
from tflite_ext.pruning.plan import pruning_wrappers
from tflite_ext.pruning.recalibrate import recalibrate_batch_norm
from tflite_ext.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from tflite_ext.pruning.strip import strip
from tflite_ext.pruning.targets import mac_ratio, sparsity_for_mac_ratio
from tflite_ext.pruning.wrapper import PruneWrapper

__all__ = ["prune", "strip", "PruningCallback", "PruneWrapper", "ConstantSparsity",
           "PolynomialDecay", "PruningSchedule", "Importance", "Magnitude", "BNScale",
           "MeanActivation", "APoZ", "Taylor", "count_macs", "mac_ratio",
           "sparsity_for_mac_ratio", "pruning_wrappers", "recalibrate_batch_norm",
           "DependencyGraph", "register_handler", "Handler", "PASS_THROUGH", "BARRIER",
           "importance", "schedules"]
