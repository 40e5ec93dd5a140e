"""The search: what each single change costs in accuracy and on the target, and the plan.

(a) `measure_candidates`: every dependency group of the model, pruned alone at each setting
    (1.0 too where the group is a residual branch `strip` can remove), one shot: masks set
    from the trained weights, `strip`, BatchNormalization re-estimated, validation accuracy.
    Each one-change model is converted to int8 and measured on the target (host timings of
    all candidates interleaved). Everything is cached.
(b) `solve`: one setting per group, least predicted accuracy loss (the sum of the one-change
    losses) with the predicted cost (the base cost times the product of the one-change cost
    ratios) within the budget: every combination when there are few, else greedy by loss per
    saving.

NetAdapt (Yang et al. 2018) measures candidates on the device the same way; AIMET's greedy
per-layer selection ranks by one-shot loss the same way.

Example:
    >>> base, candidates = measure_candidates(model, data, target, cache)
    >>> plan = solve(base, candidates, Budget(latency_us=40.0))
    >>> plan.group_sparsity
    {'s1a_conv|s1a_bn': 1.0, 's3a_conv|s3a_bn': 0.5}
"""
import dataclasses
import itertools
import re

import keras
import numpy as np

from tflite_ext import convert, pruning
from tflite_ext.bench import variants
from tflite_ext.compress.cache import fingerprint
from tflite_ext.errors import InputError
from tflite_ext.pruning.plan import PruningPlan, group_members

SETTINGS = (0.25, 0.5, 0.75)
EXHAUSTIVE_LIMIT = 20_000  # combinations solved exactly; beyond, greedy


@dataclasses.dataclass
class Candidate:
    """One change measured alone: a group at one sparsity (None: the unchanged model)."""

    group: str            # the group's first member layer, for people
    pattern: str          # regex full-matching the group's members (prune's group_sparsity)
    sparsity: float
    accuracy: float       # validation accuracy, one shot (no fine-tune)
    cost: dict            # {metric: value} on the target, plus "macs"
    tflite: bytes = None  # the int8 flatbuffer (kept for the base only)

    @property
    def name(self):
        return "base" if self.pattern is None else f"{self.group}={self.sparsity:g}"


@dataclasses.dataclass
class Plan:
    """Settings chosen per group and what they are predicted to cost."""

    choice: dict              # {pattern: sparsity} of the groups that change
    predicted_drop: float     # accuracy points lost, one-shot sum (an upper estimate)
    predicted_cost: dict

    @property
    def group_sparsity(self):
        """The `prune(group_sparsity=...)` that reproduces the plan (other groups at 0)."""
        return {**self.choice, ".*": 0.0}

    @property
    def key(self):
        return ",".join(f"{p}={s:g}" for p, s in sorted(self.choice.items())) or "none"


def prunable_groups(model, layers=None):
    """[(name, pattern)] of the model's prunable dependency groups, in model order."""
    probe = pruning.prune(model, 0.5, layers=layers)
    groups = []
    for group in PruningPlan(probe).groups:
        members = group_members(group)
        groups.append((members[0], "|".join(re.escape(m) for m in members)))
    return groups


def partial_top(group_sparsity):
    """The sparsity `prune` ramps to for these groups: the largest below 1.0 (a schedule cannot
    end at 1.0); groups at 1.0, removed blocks, reach it by their ratio to this one."""
    return max([v for v in group_sparsity.values() if v < 1.0] or [0.5])


def one_shot(model, group_sparsity, *, layers=None, round_to=8, x=None):
    """`model` with `group_sparsity` ({pattern: sparsity}) applied at once and stripped; BN
    statistics re-estimated on `x`. Raises InputError if the setting is impossible."""
    top = partial_top(group_sparsity)
    pruned = pruning.prune(model, top, layers=layers, round_to=round_to,
                           group_sparsity={**group_sparsity, ".*": 0.0})
    PruningPlan(pruned).apply(top)
    small = pruning.strip(pruned)
    if x is not None:
        pruning.recalibrate_batch_norm(small, x)
    return small


def int8(model, x_calibration):
    return convert.to_tflite(model, x_calibration[:100]).flatbuffer


def _progress(total, title, log):
    """A Keras progress bar when logging goes to stdout; else the title line alone."""
    if log is None:
        return None
    log(title)
    return keras.utils.Progbar(total, unit_name="candidate") if log is print else None


def measure_candidates(model, train, val, target, cache, *, settings=SETTINGS, layers=None,
                       round_to=8, log=print):
    """(base Candidate, [Candidate]) of every group at every setting (see the module doc).

    `train`, `val`: (x, y). Groups that cannot take a setting (1.0 where the branch is not
    removable) are skipped.
    """
    x_train, _ = train
    x_val, y_val = val
    model_key = fingerprint(model)
    groups = prunable_groups(model, layers)
    jobs = [(None, None, 0.0)] + [(name, pattern, s) for name, pattern in groups
                                  for s in (*settings, 1.0)]
    bar = _progress(len(jobs), f"measuring {len(jobs) - 1} one-change candidates of "
                    f"{len(groups)} groups on the validation data and on {target.name}", log)
    made, flatbuffers = [], {}
    for i, (name, pattern, s) in enumerate(jobs):
        key = f"candidate:{model_key}:{pattern}:{s:g}:{round_to}"
        if key not in cache:
            try:
                small = model if pattern is None else one_shot(
                    model, {pattern: s}, layers=layers, round_to=round_to, x=x_train[:512])
            except InputError:
                cache.put(key, None)  # e.g. 1.0 on a group that is not a residual branch
            else:
                fb = int8(small, x_train)
                flatbuffers[fingerprint(fb)] = fb
                cache.put_blob(fingerprint(fb), fb)
                cache.put(key, {"accuracy": variants.accuracy(small, x_val, y_val),
                                "macs": pruning.count_macs(small), "tflite": fingerprint(fb)})
        if cache.get(key) is not None:
            made.append((name, pattern, s, cache.get(key)))
        if bar:
            bar.update(i + 1)
    todo = {}
    for _, pattern, s, info in made:  # every model this target has not measured yet
        h = info["tflite"]
        if f"cost:{target.key}:{h}" not in cache and h not in todo:
            fb = flatbuffers.get(h) or cache.get_blob(h)
            if fb is None:
                small = model if pattern is None else one_shot(
                    model, {pattern: s}, layers=layers, round_to=round_to, x=x_train[:512])
                fb = int8(small, x_train)
            todo[h] = fb
    if todo:
        if log:
            log(f"measuring {len(todo)} models on {target.name}")
        for h, cost in target.measure(todo).items():
            cache.put(f"cost:{target.key}:{h}", cost)
    out = []
    for name, pattern, s, info in made:
        cost = dict(cache.get(f"cost:{target.key}:{info['tflite']}"), macs=info["macs"])
        out.append(Candidate(name, pattern, s, info["accuracy"], cost))
    # later measurements are timed beside the base: its file, kept or converted once more
    out[0].tflite = cache.get_blob(made[0][3]["tflite"]) or int8(model, x_train)
    return out[0], out[1:]


def _predict(base, chosen, metrics):
    # Costs combine as products of the one-change ratios: never below zero, right when two
    # groups shrink the same layer (both halves of a conv's channels: 1/4, not 0), and
    # conservative when they shrink different layers. Adding the savings instead predicted
    # 1,248 µs for a plan measured at 2,093 µs, and below zero for larger ones (ResNet-8,
    # reference kernels).
    cost = {m: base.cost[m] * float(np.prod([c.cost[m] / base.cost[m] for c in chosen]))
            if base.cost[m] else 0.0 for m in metrics}
    drop = sum(max(base.accuracy - c.accuracy, 0.0) for c in chosen)
    return drop, cost


def _fits(cost, limits):
    return all(cost[m] <= bound for m, bound in limits.items())


def solve(base, candidates, limits):
    """The Plan of least predicted loss whose predicted cost is within `limits` ({metric:
    bound}), or None if no combination is predicted to fit."""
    metrics = list(limits)
    options = {}
    for c in candidates:
        options.setdefault(c.pattern, [None]).append(c)
    groups = list(options)
    best = None
    if np.prod([len(options[g]) for g in groups], dtype=float) <= EXHAUSTIVE_LIMIT:
        for combo in itertools.product(*(options[g] for g in groups)):
            chosen = [c for c in combo if c is not None]
            drop, cost = _predict(base, chosen, metrics)
            if _fits(cost, limits):
                score = (drop, sum(cost[m] / limits[m] for m in metrics))
                if best is None or score < best[0]:
                    best = (score, chosen, drop, cost)
    else:
        best = _greedy(base, options, limits, metrics)
    if best is None:
        return None
    _, chosen, drop, cost = best
    return Plan({c.pattern: c.sparsity for c in chosen}, drop, cost)


def _greedy(base, options, limits, metrics):
    """Raise one group's setting at a time, the least loss per budget excess removed."""
    state = {g: 0 for g in options}
    while True:
        chosen = [options[g][i] for g, i in state.items() if i]
        drop, cost = _predict(base, chosen, metrics)
        if _fits(cost, limits):
            return (None, chosen, drop, cost)
        excess = {m: cost[m] - limits[m] for m in metrics if cost[m] > limits[m]}
        moves = []
        for g, i in state.items():
            for j in range(i + 1, len(options[g])):
                trial = dict(state, **{g: j})
                t_drop, t_cost = _predict(base, [options[h][k] for h, k in trial.items() if k],
                                          metrics)
                gain = sum(min(cost[m] - t_cost[m], excess[m]) / limits[m] for m in excess)
                if gain > 0:
                    moves.append(((t_drop - drop) / gain, g, j))
        if not moves:
            return None
        _, g, j = min(moves)
        state[g] = j


def best_reachable(base, candidates, metrics):
    """Predicted cost with every group at its cheapest measured setting (for error messages)."""
    cheapest = {}
    for c in candidates:
        score = sum(c.cost[m] / max(base.cost[m], 1e-9) for m in metrics)
        if c.pattern not in cheapest or score < cheapest[c.pattern][0]:
            cheapest[c.pattern] = (score, c)
    return _predict(base, [c for _, c in cheapest.values()], metrics)
