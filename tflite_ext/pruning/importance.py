"""Channel importance: one score per channel of a dependency group, and channel selection.

An importance criterion scores every *member* of a group (producer output channels, consumer
input features mapped back to channels, depthwise/BN carriers), normalizes each member's
scores by their mean (so layers of different scale weigh the same) and averages them.

Criteria: `Magnitude(p=1|2)` ("l1", "l2"), `BNScale` ("bn_scale": |gamma|),
`MeanActivation` ("mean_activation") and `APoZ` ("apoz") from activations seen during fit,
and `Taylor` ("taylor": |gradient x weight|, needs a batch of data).

Example:
    >>> imp = get("l2")
    >>> scores = imp(context, group)        # numpy array, one score per channel
    >>> keep = select_channels({group.id: scores}, {group.id: group.size}, 0.5)
"""
import keras
import numpy as np

from tflite_ext import wrapping
from tflite_ext.errors import InputError
from tflite_ext.pruning.handlers import handler_for
from tflite_ext.pruning.wrapper import PruneWrapper

_EPS = 1e-12


def _per_channel(values, fidx, cidx, size):
    """Sums per-feature values into per-channel values of one group."""
    return np.bincount(cidx, weights=values[fidx], minlength=size)


def _scores(values, axis):
    """Per-index sums of `values` along `axis` (over every other axis)."""
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).sum(axis=1)


class Context:
    """What importance criteria may read: the graph, layers, weights and gradients.

    Which weight of a layer holds its output channels or input features is its handler's
    knowledge (`pruning.handlers`). Numpy copies of weights are cached for one pruning step.
    """

    def __init__(self, graph, grads=None):
        self.graph = graph
        self.grads = grads or {}
        self._cache = {}

    def layer(self, node_name):
        return wrapping.unwrap(self.graph.node_by_name[node_name].layer)

    def pruner(self, node_name):
        """The node's `PruneWrapper` (also under a QuantizeWrapper), or None."""
        return wrapping.find(self.graph.node_by_name[node_name].layer, PruneWrapper)

    def value(self, variable):
        key = id(variable)
        if key not in self._cache:
            self._cache[key] = keras.ops.convert_to_numpy(variable)
        return self._cache[key]

    def _handled(self, node_name, what):
        layer = self.layer(node_name)
        return getattr(handler_for(layer), what)(layer)

    def out_kernel(self, node_name):
        """(weight, axis of output channels) of a producer."""
        return self._handled(node_name, "out_kernel")

    def in_kernel(self, node_name):
        """(weight, axis of input features) of a consumer or carrier, or None."""
        return self._handled(node_name, "in_kernel")

    def scale(self, node_name):
        """A carrier's per-channel scale (BatchNormalization's gamma), or None."""
        return self._handled(node_name, "scale")


class Importance:
    """Base class: `__call__(context, group) -> np.ndarray` of `group.size` scores."""

    name = ""
    needs_activations = False
    needs_gradients = False

    def member_scores(self, ctx, group):
        raise NotImplementedError

    def __call__(self, ctx, group):
        members = [np.asarray(m, np.float64) for m in self.member_scores(ctx, group)]
        members = [m / (m.mean() + _EPS) for m in members if m.size]
        if not members:
            return np.ones(group.size)
        return np.mean(members, axis=0)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Magnitude(Importance):
    """Lp norm of each channel's weights across all layers of the group (p = 1 or 2)."""

    def __init__(self, p=2):
        self.p = p
        self.name = f"l{p}"

    def transform(self, ctx, variable):
        return np.abs(ctx.value(variable)) ** self.p

    def member_scores(self, ctx, group):
        out = []
        for name in group.producers:
            kernel, axis = ctx.out_kernel(name)
            out.append(_scores(self.transform(ctx, kernel), axis))
        # Consumers' input features and carriers' channels (a depthwise kernel; BN has none).
        for name, fidx, cidx in group.consumers + group.carriers:
            found = ctx.in_kernel(name)
            if found is not None:
                per_feature = _scores(self.transform(ctx, found[0]), found[1])
                out.append(_per_channel(per_feature, fidx, cidx, group.size))
        return [o ** (1.0 / self.p) for o in out]


class Taylor(Magnitude):
    """First-order Taylor: |dL/dw * w| summed per channel (Molchanov et al. 2019)."""

    name = "taylor"
    needs_gradients = True

    def __init__(self):
        super().__init__(p=1)
        self.name = "taylor"

    def transform(self, ctx, variable):
        grad = ctx.grads.get(variable.path)
        if grad is None:
            return np.abs(ctx.value(variable))
        return np.abs(grad * ctx.value(variable))


class BNScale(Importance):
    """|gamma| of the BatchNormalization layers carrying the group (Network Slimming)."""

    name = "bn_scale"

    def member_scores(self, ctx, group):
        out = []
        for name, fidx, cidx in group.carriers:
            gamma = ctx.scale(name)
            if gamma is not None:
                out.append(_per_channel(np.abs(ctx.value(gamma)), fidx, cidx, group.size))
        return out or Magnitude(2).member_scores(ctx, group)


class MeanActivation(Importance):
    """Mean |activation| of each channel where it enters the next layers, seen during fit."""

    name = "mean_activation"
    needs_activations = True

    def per_feature(self, wrapper):
        count = float(keras.ops.convert_to_numpy(wrapper.act_count))
        return keras.ops.convert_to_numpy(wrapper.act_abs_sum) / max(count, 1.0)

    def member_scores(self, ctx, group):
        out = []
        for name, fidx, cidx in group.consumers:
            wrapper = ctx.pruner(name)  # the statistics live on the pruning wrapper
            if getattr(wrapper, "track_activations", False) and float(
                    keras.ops.convert_to_numpy(wrapper.act_count)) > 0:
                values = _per_channel(self.per_feature(wrapper), fidx, cidx, group.size)
                out.append(values / np.maximum(np.bincount(cidx, minlength=group.size), 1))
        return out or Magnitude(2).member_scores(ctx, group)

    def __call__(self, ctx, group):
        # Activations are on one scale per group already; keep zeros meaningful.
        members = self.member_scores(ctx, group)
        return np.mean([np.asarray(m, np.float64) for m in members], axis=0)


class APoZ(MeanActivation):
    """1 - average percentage of zeros of each channel after its activation (Hu et al. 2016)."""

    name = "apoz"

    def per_feature(self, wrapper):
        count = float(keras.ops.convert_to_numpy(wrapper.act_count))
        return 1.0 - keras.ops.convert_to_numpy(wrapper.act_zero_sum) / max(count, 1.0)


IMPORTANCES = {"l1": lambda: Magnitude(1), "l2": lambda: Magnitude(2), "bn_scale": BNScale,
               "mean_activation": MeanActivation, "apoz": APoZ, "taylor": Taylor}


def get(importance):
    """An `Importance` from a name ("l1", "l2", "bn_scale", "mean_activation", "apoz",
    "taylor") or an instance."""
    if isinstance(importance, Importance):
        return importance
    if importance not in IMPORTANCES:
        raise InputError(f"importance must be one of {sorted(IMPORTANCES)} or an Importance. "
                         f"Received: importance={importance!r}")
    return IMPORTANCES[importance]()


def _keep_count(n, keep, min_channels, round_to):
    if round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return int(min(n, max(keep, min_channels, 1)))


def select_channels(scores, sizes, sparsity, scope="local", min_channels=1, round_to=1,
                    group_sparsity=None):
    """Chooses the channels to keep in every group.

    Args:
        scores: {group id: per-channel scores}; -inf marks channels already pruned.
        sizes: {group id: number of channels}.
        sparsity: fraction of channels to remove, per group ("local") or over all groups
            ("global", scores are compared after per-group mean normalization).
        min_channels: never keep fewer channels in a group.
        round_to: keep a multiple of this many channels (e.g. 8 for SIMD-friendly widths).
        group_sparsity: {group id: sparsity} replacing `sparsity` for those groups ("local"
            scope only); 1.0 removes every channel of the group.

    Returns:
        {group id: boolean keep array}.
    """
    keeps = {}
    group_sparsity = group_sparsity or {}
    if group_sparsity and scope != "local":
        raise InputError("Per-group sparsity needs scope='local'. Received: "
                         f"scope={scope!r}")
    if scope == "global":
        ids = list(scores)
        flat = np.concatenate([_normalized(scores[g]) for g in ids])
        owner = np.concatenate([np.full(sizes[g], i) for i, g in enumerate(ids)])
        n_prune = int(np.floor(sparsity * flat.size))
        pruned = np.argsort(flat, kind="stable")[:n_prune]
        removed = np.bincount(owner[pruned], minlength=len(ids))
        counts = {g: sizes[g] - removed[i] for i, g in enumerate(ids)}
    elif scope == "local":
        counts = {g: sizes[g] - int(np.floor(group_sparsity.get(g, sparsity) * sizes[g]))
                  for g in scores}
    else:
        raise InputError(f"scope must be 'local' or 'global'. Received: scope={scope!r}")
    for g, s in scores.items():
        n = sizes[g]
        if group_sparsity.get(g, 0.0) >= 1.0:
            k = 0  # the whole group goes (pruning.removal): no minimum, no rounding
        else:
            k = _keep_count(n, counts[g], min_channels, round_to)
        keep = np.zeros(n, bool)
        keep[np.argsort(-np.asarray(s), kind="stable")[:k]] = True
        keeps[g] = keep
    return keeps


def _normalized(s):
    s = np.asarray(s, np.float64)
    finite = np.isfinite(s)
    mean = s[finite].mean() if finite.any() else 1.0
    return np.where(finite, s / (mean + _EPS), -np.inf)
