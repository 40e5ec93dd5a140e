"""`prune(model, ...)`: wraps the chosen layers of a functional model for pruning during fit.

Example:
    >>> pruned = prune(model, PolynomialDecay(0.0, 0.6, 0, 400, frequency=50), round_to=8)
    >>> compile_classifier(pruned).fit(x, y, epochs=5, callbacks=[PruningCallback()])
    >>> small = strip(pruned)                 # ordinary Keras model, channels removed
"""
import re

from tflite_ext import wrapping
from tflite_ext.errors import InputError
from tflite_ext.functional import clone_layer, layer_matcher, rebuild, unique_names
from tflite_ext.onednn import warn_if_training_crashes
from tflite_ext.pruning import importance as importance_lib
from tflite_ext.pruning.graph import graph_of
from tflite_ext.pruning.plan import group_members, group_overrides
from tflite_ext.pruning.removal import check_removable
from tflite_ext.pruning.schedules import ConstantSparsity, PruningSchedule, check_sparsity
from tflite_ext.pruning.wrapper import GRANULARITIES, PruneWrapper, prunable


def _check_group_sparsity(group_sparsity):
    """{compiled regex: sparsity} in the caller's order, or {} for None."""
    if group_sparsity is None:
        return {}
    if not isinstance(group_sparsity, dict) or not group_sparsity:
        raise InputError("group_sparsity must be a non-empty dict {layer-name regex: sparsity}. "
                         f"Received: group_sparsity={group_sparsity!r}")
    checked = {}
    for pattern, value in group_sparsity.items():
        try:
            regex = re.compile(pattern)
        except (TypeError, re.error):
            raise InputError("group_sparsity keys must be layer-name regexes. "
                             f"Received: group_sparsity key {pattern!r}") from None
        checked[regex] = check_sparsity(value, f"group_sparsity[{pattern!r}]", allow_one=True)
    return checked


def _schedule(sparsity):
    if isinstance(sparsity, PruningSchedule):
        return sparsity
    return ConstantSparsity(check_sparsity(sparsity), begin_step=0, frequency=100)


def prune(model, sparsity=0.5, *, layers=None, importance="l2", scope="local", min_channels=1,
          round_to=1, granularity="channel", opaque=(), group_sparsity=None):
    """Returns a copy of `model` whose chosen layers are wrapped in `PruneWrapper`s.

    Train the result with `PruningCallback()` in `fit`, then call `strip()`.

    Args:
        model: a functional or Sequential Keras model (nested models are flattened).
        sparsity: a float in [0, 1) (constant sparsity, re-ranked every 100 steps) or a
            schedule (`ConstantSparsity`, `PolynomialDecay`). For "channel" granularity it is
            the fraction of channels removed per dependency group ("local") or overall
            ("global"); for "unstructured" the fraction of weights per layer. "2:4" ignores it.
        layers: which layers to prune: a name/regex, a layer class, a list of those, or a
            callable `layer -> bool`. Default: every prunable layer. With "channel"
            granularity a chosen layer prunes its whole dependency group (every layer tied to
            its output channels is masked with it).
        importance: "l1", "l2", "bn_scale", "mean_activation", "apoz", "taylor" or an
            `Importance` instance.
        scope: "local" (each group loses `sparsity` of its channels) or "global" (the least
            important channels over all groups).
        min_channels: minimum channels kept per group.
        round_to: kept channels per group rounded to a multiple of this (e.g. 8).
        granularity: "channel" (structured; `strip` removes channels), "unstructured"
            (magnitude) or "2:4" (two of every four weights along the input axis).
        opaque: layer names the graph treats as barriers (for unknown layer types).
        group_sparsity: per-group overrides of the final sparsity, a dict
            `{layer-name regex: sparsity in [0, 1]}` ("channel" granularity, "local" scope).
            Each pruned dependency group takes the value of the FIRST pattern, in dict order,
            that full-matches (`re.fullmatch`) the name of any of its members: the layers
            whose output channels are the group (producer Conv/Dense layers and carriers such
            as BatchNormalization; not the layers consuming it). Other groups follow
            `sparsity`. Every pattern must match at least one pruned group. The schedule ramps
            each overridden group in proportion: its target at a step is
            `override * schedule(step) / schedule.final_sparsity` (so the final sparsity of
            the schedule must be > 0), reached exactly at the schedule's end. 1.0 removes the
            group entirely (no `min_channels`, no rounding; the last channels go at the
            schedule's end): allowed for a group that feeds only a residual branch ending in
            an Add; the callback then silences the branch and `strip` removes it with its
            Add, leaving the block as the identity (a branch with a sigmoid on it keeps a
            constant, and its Add becomes a constant add; `pruning.removal`).

    Example:
        >>> pruned = prune(models.digits_cnn(), 0.75, layers=keras.layers.Conv2D)
        >>> pruned = prune(models.resnet8(), PolynomialDecay(0.0, 0.7, 0, 600, frequency=20),
        ...                group_sparsity={"s3.*": 0.5, "s2a_.*": 0.75}, round_to=8)
    """
    schedule = _schedule(sparsity)
    overrides = _check_group_sparsity(group_sparsity)
    imp = importance_lib.get(importance)
    _check_arguments(schedule, overrides, scope, granularity, min_channels, round_to)
    graph = graph_of(model, opaque)
    _check_unwrapped(graph, model)
    wrap, consumers, groups = _layers_to_wrap(graph, layer_matcher(layers), granularity, layers)
    policy = {"importance": imp.name, "scope": scope, "min_channels": min_channels,
              "round_to": round_to}
    names = unique_names(graph)
    if overrides:
        policy["group_sparsity"] = _checked_overrides(graph, groups, overrides, names)

    def make_layer(node):
        source = node.layer
        config = source.get_config()
        config["name"] = names[node.name]
        layer = clone_layer(source, config)
        init = lambda new, src=source: new.set_weights(src.get_weights())  # noqa: E731
        if node.name not in wrap:
            return layer, init
        wrapper = PruneWrapper(layer, granularity=granularity, schedule=schedule, policy=policy,
                               track_activations=imp.needs_activations and node.name in consumers)
        # A custom Importance object cannot go into the saved config (only its name does);
        # the callback uses it while this model lives.
        wrapper.tflite_ext_importance = imp
        return wrapper, lambda new, src=source: new.layer.set_weights(src.get_weights())

    pruned = rebuild(graph, make_layer)
    warn_if_training_crashes(pruned.layers, "prune()")  # it is about to be trained
    return pruned


def _check_arguments(schedule, overrides, scope, granularity, min_channels, round_to):
    if overrides:
        if granularity != "channel" or scope != "local":
            raise InputError("group_sparsity needs granularity='channel' and scope='local'. "
                             f"Received: granularity={granularity!r}, scope={scope!r}")
        if not schedule.final_sparsity > 0:
            raise InputError("group_sparsity ramps with the schedule, whose final sparsity "
                             "must be > 0. Received: final sparsity="
                             f"{schedule.final_sparsity!r}")
    if scope not in ("local", "global"):
        raise InputError(f"scope must be 'local' or 'global'. Received: scope={scope!r}")
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {GRANULARITIES}. "
                         f"Received: granularity={granularity!r}")
    for name, value in (("min_channels", min_channels), ("round_to", round_to)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1. Received: {name}={value!r}")


def _check_unwrapped(graph, model):
    if any(wrapping.find(n.layer, PruneWrapper) is not None for n in graph.nodes):
        raise InputError(f"The model is already wrapped for pruning. Received: model={model.name}")
    if any(isinstance(n.layer, wrapping.Wrapper) for n in graph.nodes):
        raise InputError("prune() takes the float model: call quantize_model(prune(model)) for "
                         f"pruning during QAT. Received: model={model.name} (already wrapped)")


def _layers_to_wrap(graph, match, granularity, layers):
    """(node names to wrap, the consumers among them, the pruned groups).

    With "channel" granularity a chosen layer brings its whole group: every producer of its
    output channels and every layer reading them (their input masks drop the channels).
    """
    chosen = {n.name for n in graph.nodes if n.inputs and prunable(n.layer) and match(n.layer)}
    if not chosen:
        raise InputError("layers matched no Conv/Dense layer of the model. "
                         f"Received: layers={layers!r}")
    if granularity != "channel":
        return chosen, set(), []
    wrap, consumers, groups = set(), set(), []
    for group in graph.groups:
        if chosen & set(group.producers):
            groups.append(group)
            wrap.update(group.producers)
            consumers.update(name for name, _, _ in group.consumers)
    wrap |= consumers
    if not wrap:
        raise InputError("None of the chosen layers has prunable output channels (they "
                         f"feed a model output or a barrier). Received: layers={layers!r}")
    return wrap, consumers, groups


def _checked_overrides(graph, groups, overrides, names):
    """The policy's {pattern: sparsity}, once every pattern matches a pruned group and every
    group pruned to 1.0 can go (`removal.check_removable`)."""
    # Patterns are matched against the names the layers get in the pruned model, which is
    # what the PruningCallback sees.
    members = [[names[m] for m in group_members(g)] for g in groups]
    for regex in overrides:
        if not any(regex.fullmatch(m) for ms in members for m in ms):
            raise InputError("group_sparsity pattern matches no layer of a pruned group. "
                             f"Received: group_sparsity key {regex.pattern!r}")
    patterns = {r.pattern: v for r, v in overrides.items()}
    removed = [g for g, v in group_overrides(groups, patterns, names).items() if v >= 1.0]
    check_removable(graph, removed)
    return patterns
