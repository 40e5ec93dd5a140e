"""Finding the sparsity that meets a compute target.

Example:
    >>> sparsity, ratio = sparsity_for_mac_ratio(models.resnet8(), 3.0, round_to=4)
    >>> pruned = prune(model, PolynomialDecay(0.0, sparsity, 0, 400, frequency=40), round_to=4)
"""
from tflite_ext.errors import InputError
from tflite_ext.pruning.api import prune
from tflite_ext.pruning.plan import PruningPlan
from tflite_ext.pruning.macs import count_macs
from tflite_ext.pruning.strip import strip


def mac_ratio(model, sparsity, **prune_kwargs):
    """MACs of `model` / MACs after pruning it at `sparsity` (current weights rank channels)."""
    pruned = prune(model, sparsity, **prune_kwargs)
    PruningPlan(pruned).apply(sparsity)
    return count_macs(model) / count_macs(strip(pruned))


def sparsity_for_mac_ratio(model, ratio, *, step=0.025, max_sparsity=0.95, **prune_kwargs):
    """The smallest sparsity (on a `step` grid) whose stripped model has `ratio`x fewer MACs.

    Bisection over the grid: the MAC ratio grows with sparsity. `prune_kwargs` (layers,
    scope, round_to, min_channels, ...) are those you will pass to `prune`.

    Returns:
        (sparsity, reached ratio).
    """
    if not ratio >= 1.0:
        raise InputError(f"ratio must be >= 1. Received: ratio={ratio!r}")
    if not 0 < step < 1 or not 0 < max_sparsity < 1:
        raise InputError(f"step and max_sparsity must be in (0, 1). Received: step={step!r}, "
                         f"max_sparsity={max_sparsity!r}")
    lo, hi = 0, int(round(max_sparsity / step))
    best = (hi * step, mac_ratio(model, hi * step, **prune_kwargs))
    if best[1] < ratio:
        raise InputError(f"Even sparsity={max_sparsity} gives only {best[1]:.2f}x fewer MACs. "
                         f"Received: ratio={ratio}")
    while lo < hi:
        mid = (lo + hi) // 2
        r = mac_ratio(model, mid * step, **prune_kwargs)
        if r >= ratio:
            hi, best = mid, (round(mid * step, 4), r)
        else:
            lo = mid + 1
    return best
