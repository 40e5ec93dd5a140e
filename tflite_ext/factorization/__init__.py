"""Low-rank factorization: trained layers become pairs of thinner layers (truncated SVD).

`factorize` builds the factorized model, `plan` says what it would do, `DeepTwist` trains a
model toward low rank first (Lee et al., arXiv 1810.12823) so factorizing it costs little.

Example:
    >>> from tflite_ext import factorization
    >>> print(factorization.plan(model, param_budget=0.4, round_to=8))
    >>> small = factorization.factorize(model, param_budget=0.4, round_to=8)
"""
from tflite_ext.factorization.api import factorize, kernel_error
from tflite_ext.factorization.deeptwist import DeepTwist
from tflite_ext.factorization.plan import Plan, Row, plan

__all__ = ["DeepTwist", "Plan", "Row", "factorize", "kernel_error", "plan"]
