"""Compress to a budget, measured on the target: the tool finds the recipe.

Example:
    >>> from tflite_ext.compress import Budget, compress
    >>> result = compress(model, (x_train, y_train), (x_val, y_val),
    ...                   Budget.parse(latency="40us"), target="reference")
"""
import sys
import types

from tflite_ext.compress.api import BudgetError, Result, compress
from tflite_ext.compress.budget import Budget
from tflite_ext.compress.targets import VELA_CONFIGS, Target, get_target

__all__ = ["Budget", "BudgetError", "Result", "Target", "VELA_CONFIGS", "compress",
           "get_target"]


class _CallableModule(types.ModuleType):
    """`tflite_ext.compress(model, ...)` calls `compress.compress`: the module is the verb."""

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
