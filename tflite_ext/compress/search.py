"""The search: what each single change costs in accuracy and on the target, and the plan.

A change is one of
    prune      a dependency group at a sparsity (1.0 where `strip` can remove the block),
    factorize  a Dense/Conv layer at a fraction of its full rank (`factorization`),
    cluster    a Dense/Conv kernel at a number of shared values, then LUT-compressed for
               TFLite Micro (only on targets that run `TFLM_DECODE`: `Target.lut`).

(a) `measure_candidates`: every change alone, one shot (masks from the trained weights and
    `strip`, BatchNormalization re-estimated; SVD; k-means without training), converted to
    int8, its validation accuracy in LiteRT and its cost on the target measured (all host
    timings interleaved). Everything is cached.
(b) `solve`: at most one setting per group or layer and kind, the least predicted accuracy
    loss (the sum of the one-change losses) with the predicted cost (the base cost times the
    product of the one-change cost ratios) within the limits. Combinations are scored all at
    once with NumPy; beyond `EXHAUSTIVE_LIMIT`, greedily.
(c) `one_shot_plan`: the whole plan in one shot, so what the cost depends on (the shapes,
    not the training) is measured before a fine-tune is spent on it.

NetAdapt (Yang et al. 2018) measures candidates on the device the same way; AIMET's greedy
per-layer selection ranks by one-shot loss the same way.

Example:
    >>> base, candidates = measure_candidates(model, train, val, target, cache)
    >>> plan = solve(base, candidates, {"latency_us": 40.0})
    >>> plan.key
    'cluster:fc1=8,prune:conv2|bn2=0.5'
"""
import dataclasses
import functools
import itertools
import math
import re

import keras
import numpy as np

from tflite_ext import convert, lut, pruning
from tflite_ext.bench import variants
from tflite_ext.compress.cache import fingerprint
from tflite_ext.errors import InputError
from tflite_ext.factorization.plan import candidates as factor_candidates
from tflite_ext.pruning.plan import PruningPlan, group_members

SETTINGS = (0.25, 0.5, 0.75, 0.875)  # prune: fractions of a group's channels removed
RANK_FRACTIONS = (0.5, 0.25)       # factorize, when asked for: fractions of full rank kept
CLUSTERS = (16, 8, 4)              # cluster: shared values per kernel (per channel for convs)
MIN_CLUSTER_WEIGHTS = 1024         # smaller kernels: a DECODE costs about what it saves
EXHAUSTIVE_LIMIT = 200_000_000     # combinations scored exactly; beyond, greedy
CHUNK = 500_000                    # combinations scored at once
KINDS = ("prune", "factorize", "cluster")


@dataclasses.dataclass(frozen=True)
class Change:
    """One change to the model: `kind` of `key` (a group's regex or a layer name) at
    `setting` (sparsity, rank fraction or clusters); `name` is for people."""

    kind: str
    key: str
    setting: float
    name: str

    @property
    def label(self):
        return f"{self.kind}:{self.name}={self.setting:g}"


@dataclasses.dataclass
class Candidate:
    """A change measured alone (`change` None: the unchanged model)."""

    change: Change
    accuracy: float       # int8 validation accuracy, one shot (no fine-tune)
    cost: dict            # {metric: value} on the target, plus "macs"
    tflite: bytes = None  # the int8 flatbuffer (kept for the base only)
    layers: dict = None   # {layer: (kernel weights, output channels)}: `layer_sizes`
    flash_fit: object = None  # the base's: coefficients of `flash_features` (`fit_flash`)
    signature_bytes: float = 0  # the base's: flash its signature def adds on the target
    exponents: dict = dataclasses.field(default_factory=dict)  # the base's: `fit_exponents`

    @property
    def name(self):
        return "base" if self.change is None else self.change.label


@dataclasses.dataclass
class Plan:
    """The changes chosen and what they are predicted to cost."""

    changes: tuple            # of Change, at most one per (kind, key)
    predicted_drop: float     # accuracy points lost, one-shot sum (an upper estimate)
    predicted_cost: dict

    def of(self, kind):
        return {c.key: c.setting for c in self.changes if c.kind == kind}

    @property
    def group_sparsity(self):
        """The `prune(group_sparsity=...)` that reproduces the pruning (other groups at 0)."""
        return {**self.of("prune"), ".*": 0.0}

    @property
    def key(self):
        return ",".join(sorted(c.label for c in self.changes)) or "none"


# ------------------------------------------------------------------------ the changes

def prunable_groups(model, layers=None):
    """[(name, pattern)] of the model's prunable dependency groups, in model order."""
    probe = pruning.prune(model, 0.5, layers=layers)
    groups = []
    for group in PruningPlan(probe).groups:
        members = group_members(group)
        groups.append((members[0], "|".join(re.escape(m) for m in members)))
    return groups


def factorizations(model, fractions, layers=None):
    """[(layer, rank fraction)] that `factorize` can do and that leave fewer kernel weights
    (Dense, 1x1 and kxk Conv2D): a square layer at half its rank saves nothing, so it is
    not worth a measurement."""
    try:
        found = factor_candidates(model, layers)
    except InputError:  # nothing to factorize
        return []
    return [(c.name, f) for c in found for f in fractions
            if c.params(rank_at(f, c.max_rank)) < c.params()]


def clusterings(model, clusters, layers=None):
    """[(layer, clusters)] of the Dense/Conv kernels with at least MIN_CLUSTER_WEIGHTS weights
    whose LUT would save more than its tables: a convolution shares values per output channel
    (`cluster_arguments`), so a channel of n weights saves n * (8 - bits) / 8 bytes and its
    table costs 2^bits (a 1x1 conv on 16 channels cannot pay for 16 values)."""
    from tflite_ext.clustering.wrapper import clusterable, kernel_names
    from tflite_ext.functional import layer_matcher

    match = layer_matcher(layers)
    out = []
    for layer in model.layers:
        if not (clusterable(layer) and kernel_names(layer) and match(layer)):
            continue
        shape = tuple(layer.kernel.shape)
        if math.prod(shape) < MIN_CLUSTER_WEIGHTS:
            continue
        per_table = math.prod(shape[:-1]) if isinstance(layer, keras.layers.Conv2D) \
            else math.prod(shape)
        out += [(layer.name, k) for k in clusters
                if per_table * (8 - index_bits(k)) / 8 > 2 ** index_bits(k)]
    return out


def changes_of(model, target, *, settings=SETTINGS, rank_fractions=(),
               clusters=CLUSTERS, layers=None):
    """Every single change the search measures on `model` for `target`."""
    out = [Change("prune", pattern, s, name) for name, pattern in prunable_groups(model, layers)
           for s in (*settings, 1.0)]
    out += [Change("factorize", name, f, name)
            for name, f in factorizations(model, rank_fractions, layers)]
    if getattr(target, "lut", False):
        out += [Change("cluster", name, k, name)
                for name, k in clusterings(model, clusters, layers)]
    return out


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
    if x is not None:  # batches of 128: a quarter of the eager calls of 32, same statistics
        pruning.recalibrate_batch_norm(small, x, batch_size=128)
    return small


def rank_at(fraction, full, round_to=1):
    """`fraction` of a full rank, rounded up to `round_to`, between 1 and `full`."""
    return min(full, max(1, round_to * math.ceil(fraction * full / round_to)))


def ranks(model, fractions, round_to=1):
    """{layer: rank} for {layer: fraction of its full rank} on `model` (after strip, the full
    rank is the stripped layer's), rounded up to `round_to`, at least 1."""
    full = {c.name: c.max_rank
            for c in factor_candidates(model, [re.escape(n) for n in fractions])}
    return {name: rank_at(f, full[name], round_to) for name, f in fractions.items()}


def index_bits(clusters):
    """Bits of a LUT index for `clusters` shared values."""
    return math.ceil(math.log2(clusters))


def factorized(model, fractions, round_to=1):
    """`model` with each layer of {layer: rank fraction} factorized (SVD, no fine-tune)."""
    from tflite_ext import factorization

    return factorization.factorize(model, rank=ranks(model, fractions, round_to),
                                   skip_unprofitable=False, verbose=False)


def cluster_arguments(model, clusters):
    """`cluster(...)` arguments for {layer: clusters}: per channel for convolutions (their int8
    weights are per channel, so the tables cost nothing more), linear centroids; a layer
    `factorize` split is clustered in both halves."""
    convs = {layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}
    return dict(clusters={f"{re.escape(n)}(_svd)?": k for n, k in clusters.items()},
                per_channel={f"{re.escape(n)}(_svd)?": n in convs for n in clusters},
                init="linear")


def clustered_one_shot(model, clusters):
    """`model` with {layer: clusters} snapped to its initial centroids (no training)."""
    from tflite_ext import clustering

    return clustering.strip_clustering(clustering.cluster(model, **cluster_arguments(
        model, clusters)))


def int8(model, x_calibration, qat=False, signature=False):
    """The int8 flatbuffer, calibrated on `x_calibration`; with `qat`, converted the way a
    QAT model is (ranges observed on it by `calibrate`, no training): the same tensors and
    sizes as the QAT fine-tune will give, which PTQ does not (25,624 against 23,968 bytes for
    the digits CNN pruned by 3/4).

    Without a `signature` (`to_tflite(signature=False)`, 3.5-7x faster): the file the
    SavedModel route gives, less its signature def and I/O tensor names (`names.strip` of
    both is the same bytes), so the same math and, on the target, the same time; its flash
    is corrected by the base's difference (`Candidate.signature_bytes`)."""
    if not qat:
        return convert.to_tflite(model, x_calibration[:100], signature=signature).flatbuffer
    from tflite_ext.quantization import calibrate, quantize_model

    wrapped = quantize_model(model)
    # One pass of 256 (the ranges: their extremes), not 16 eager batches (0.9 s of a digits
    # candidate's 2.2 s) whose moving average the first batch's extremes dominated
    calibrate(wrapped, x_calibration[:256], batch_size=256)
    return convert.to_tflite(wrapped, signature=signature).flatbuffer


def with_lut(flatbuffer):
    """The TFLM LUT copy of an int8 flatbuffer (what a `cluster` change costs in flash)."""
    return lut.compress(flatbuffer)[0]


def one_shot_plan(model, plan, x, *, layers=None, round_to=8, qat=False):
    """(Keras model, int8 flatbuffer, flatbuffer as deployed) of `plan` applied in one shot:
    prune and strip, factorize, cluster (then LUT: the deployed file). Its cost on the target
    is the fine-tuned plan's to within what training changes (nothing for flash and arena)."""
    small = model
    if plan.of("prune"):
        small = one_shot(model, plan.of("prune"), layers=layers, round_to=round_to,
                         x=x[:512])
    if plan.of("factorize"):
        small = factorized(small, plan.of("factorize"))
    if plan.of("cluster"):
        small = clustered_one_shot(small, plan.of("cluster"))
        plain = int8(small, x, qat=True)  # clustering trains with QAT
        return small, plain, with_lut(plain)
    plain = int8(small, x, qat=qat)
    return small, plain, plain


# ------------------------------------------------------------------------ the flash model
#
# Flash is set by the shapes: a file is about a fixed part, plus its kernels' bytes (weights
# x bits / 8), plus a few bytes per output channel (bias, scale, zero point, LUT table). Fitted
# by least squares on the measured candidates, that model predicts combinations where
# products of ratios cannot: on the digits CNN (micro), pruning every group by 3/4 measured
# 25,624 bytes against 38,890 predicted by the product, and pruning + clustering + factorizing
# 18,736 against 11,235 (the cluster savings were counted on the unpruned kernels).

def layer_sizes(model):
    """{layer: (kernel weights, output channels)} of the layers with a kernel; a factorized
    pair is counted under the original name."""
    out = {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        name = layer.name[:-4] if layer.name.endswith("_svd") else layer.name
        weights, channels = out.get(name, (0, 0))
        out[name] = (weights + math.prod(kernel.shape), channels + int(kernel.shape[-1]))
    return out


def _bits(change):
    if change is not None and change.kind == "cluster":
        return {change.key: index_bits(change.setting)}
    return {}


def flash_features(sizes, bits):
    """[1, kernel bytes, output channels, LUT tensors, LUT table entries]: what
    `fit_flash`'s coefficients multiply. `bits`: {layer: index bits} of the clustered ones."""
    return [1.0, sum(w * bits.get(n, 8) / 8 for n, (w, _) in sizes.items()),
            float(sum(c for _, c in sizes.values())), float(len(bits)),
            float(sum(sizes[n][1] * 2 ** b for n, b in bits.items() if n in sizes))]


def fit_flash(base, candidates, plans=()):
    """Least-squares coefficients of `flash_features` over the measured candidates and
    `plans` ([(layer sizes, {layer: bits}, flash bytes)] of whole plans measured), or None.

    One-change models all sit near the base, where kernel bytes and channels move together;
    the plans measured far from it (`compress` adds each one it previews) pin the fixed part
    and the per-channel bytes."""
    known = [c for c in [base, *candidates] if c.layers is not None]
    if "flash_bytes" not in base.cost or len(known) < 4:
        return None
    x = [flash_features(c.layers, _bits(c.change)) for c in known]
    y = [c.cost["flash_bytes"] for c in known]
    weight = max(1.0, len(known) / 4)  # a far plan says more than one more near candidate
    x += [[weight * v for v in flash_features(sizes, bits)] for sizes, bits, _ in plans]
    y += [weight * flash for _, _, flash in plans]
    return np.linalg.lstsq(np.array(x), np.array(y, dtype=float), rcond=None)[0]


def plan_bits(plan):
    """{layer: index bits} of a plan's clustered layers."""
    return {k: index_bits(v) for k, v in plan.of("cluster").items()}


def _layer_terms(base, c):
    """Per base layer, what `c` brings: (log kernel-byte ratio, log channel ratio, LUT table
    entries per channel, 0 or 2^bits)."""
    names = sorted(base.layers)
    zero = np.zeros(len(names))
    if c.change.kind == "cluster":
        bits = _bits(c.change)
        lw = np.array([math.log(bits[n] / 8) if n in bits else 0.0 for n in names])
        return lw, zero, np.array([2.0 ** bits[n] if n in bits else 0.0 for n in names])
    sizes = c.layers or base.layers
    with np.errstate(divide="ignore"):  # a removed layer: ratio 0, log -inf, bytes 0
        lw = np.log([sizes.get(n, (0, 0))[0] / base.layers[n][0] for n in names])
        lc = np.log([sizes.get(n, (0, 0))[1] / base.layers[n][1] for n in names])
    return lw, lc, zero


def _flash(base, lw, lc, table):
    """The flash model at per-layer terms (arrays, last axis: layers) summed over changes."""
    names = sorted(base.layers)
    weights = np.array([base.layers[n][0] for n in names], dtype=float)
    channels = np.array([base.layers[n][1] for n in names], dtype=float) * np.exp(lc)
    fixed, per_byte, per_channel, per_lut, per_entry = base.flash_fit
    return (fixed + per_byte * (weights * np.exp(lw)).sum(-1) + per_channel * channels.sum(-1)
            + per_lut * (table > 0).sum(-1) + per_entry * (channels * table).sum(-1))


# ------------------------------------------------------------------------ measuring

def _progress(total, title, log):
    """A Keras progress bar when logging goes to stdout; else the title line alone."""
    if log is None:
        return None
    log(title)
    return keras.utils.Progbar(total, unit_name="candidate") if log is print else None


def _cache_key(model_key, change, round_to, qat):
    # "candidate9": accuracy of the int8 file converted without a signature (`int8`); the
    # first caches' "candidate" held the float model's, which other entries must not be
    # ranked against, and "candidate8" files had signatures
    way = ":qat" if qat else ""
    if change is None:
        return f"candidate9:{model_key}:None:0:{round_to}{way}"
    if change.kind == "prune":
        return f"candidate9:{model_key}:{change.key}:{change.setting:g}:{round_to}{way}"
    # ":lut2": a clustered candidate's LUT file, its indices without the copied quantization
    lut = ":lut2" if change.kind == "cluster" else ""
    return f"candidate9:{model_key}:{change.kind}:{change.key}:{change.setting:g}{way}{lut}"


def _one_change(model, change, x, *, layers, round_to, qat):
    """(Keras model, int8, deployed flatbuffer) of `model` with one change, or InputError."""
    changes = () if change is None else (change,)
    return one_shot_plan(model, Plan(changes, 0.0, {}), x, layers=layers, round_to=round_to,
                         qat=qat)


def measure_candidates(model, train, val, target, cache, *, settings=SETTINGS,
                       rank_fractions=(), clusters=CLUSTERS, layers=None,
                       round_to=8, qat=False, log=print):
    """(base Candidate, [Candidate]) of every change alone (see the module doc).

    `train`, `val`: (x, y). Changes a model cannot take (1.0 where the branch is not
    removable, a rank that would not save) are skipped.
    """
    x_train, _ = train
    x_val, y_val = val
    model_key = fingerprint(model)
    jobs = [None] + changes_of(model, target, settings=settings, rank_fractions=rank_fractions,
                               clusters=clusters, layers=layers)
    kinds = {k: sum(1 for c in jobs[1:] if c.kind == k) for k in KINDS}
    bar = _progress(len(jobs), f"measuring {len(jobs) - 1} one-change candidates ("
                    + ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
                    + f") on the validation data and on {target.name}", log)
    made, flatbuffers = [], {}
    for i, change in enumerate(jobs):
        key = _cache_key(model_key, change, round_to, qat)
        if key not in cache:
            try:
                small, plain, fb = _one_change(model, change, x_train, layers=layers,
                                               round_to=round_to, qat=qat)
            except InputError:
                cache.put(key, None)  # e.g. 1.0 on a group that is not a residual branch
            else:
                flatbuffers[fingerprint(fb)] = fb
                cache.put_blob(fingerprint(fb), fb)
                # LiteRT on the int8 file: what ships, and no Keras trace per candidate
                cache.put(key, {"accuracy": variants.accuracy(plain, x_val, y_val),
                                "macs": pruning.count_macs(small), "tflite": fingerprint(fb),
                                "layers": layer_sizes(small)})
        if cache.get(key) is not None:
            made.append((change, cache.get(key)))
        if bar:
            bar.update(i + 1)
    made = _distinct(made)
    # The unchanged model as it ships, signature def and all (the candidates have none):
    # its flash against its unsigned file's is what a signature adds on this target.
    signed_key = _cache_key(model_key, None, round_to, qat) + ":signed"

    def signed_file():
        return int8(model, x_train, qat=qat, signature=True)

    if signed_key not in cache:
        fb = signed_file()
        flatbuffers[fingerprint(fb)] = fb
        cache.put_blob(fingerprint(fb), fb)
        cache.put(signed_key, fingerprint(fb))
    remake = {info["tflite"]: functools.partial(_one_change, model, change, x_train,
                                                layers=layers, round_to=round_to, qat=qat)
              for change, info in made}
    remake[cache.get(signed_key)] = lambda: (None, None, signed_file())
    todo = {}
    for h, make in remake.items():  # every model this target has not measured yet
        if f"cost:{target.key}:{h}" not in cache:
            todo[h] = flatbuffers.get(h) or cache.get_blob(h) or make()[2]
    if todo:
        if log:
            log(f"measuring {len(todo)} models on {target.name}")
        for h, cost in target.measure_least(todo).items():  # the base among them
            cache.put(f"cost:{target.key}:{h}", cost)
    signed = cache.get(f"cost:{target.key}:{cache.get(signed_key)}")
    unsigned = cache.get(f"cost:{target.key}:{made[0][1]['tflite']}")
    extra = signed.get("flash_bytes", 0) - unsigned.get("flash_bytes", 0)
    out = [Candidate(change, info["accuracy"],
                     with_signature(dict(cache.get(f"cost:{target.key}:{info['tflite']}"),
                                         macs=info["macs"]), extra),
                     layers=_sizes(info.get("layers")))
           for change, info in made]
    out[0].signature_bytes = extra
    out[0].flash_fit = fit_flash(out[0], out[1:])
    # later measurements are timed beside the base: its file, kept or converted once more
    out[0].tflite = cache.get_blob(made[0][1]["tflite"]) or int8(model, x_train, qat=qat)
    return out[0], out[1:]


def with_signature(cost, extra):
    """`cost` of a file converted without a signature (`int8`) as its signed file's: flash
    plus `extra`, the bytes the base's signature def takes on the target (0 on `micro`,
    which strips it; about 150 in a host file). Names and signatures take no time."""
    if "flash_bytes" in cost:
        cost = dict(cost, flash_bytes=cost["flash_bytes"] + extra)
    return cost


def _strength(change):
    """Orders one slot's settings from mild to strong: more sparsity, less rank, fewer values."""
    return change.setting if change.kind == "prune" else -change.setting


def _distinct(made):
    """`made` ([(change, info)], the base first) without the changes whose file is the base's
    or a milder setting's of the same group or layer: kept channels are rounded to multiples
    of `round_to`, so ResNet-8's 16-channel stem pruned by 1/2, 3/4 or 7/8 keeps 8 channels
    each time (21 distinct files of its 30 candidates), and the solver would preview each
    plan that differs only there."""
    base_file = made[0][1]["tflite"]
    mildest = {}
    for change, info in made[1:]:
        same = (change.kind, change.key, info["tflite"])
        mildest[same] = min(mildest.get(same, change), change, key=_strength)
    return made[:1] + [(change, info) for change, info in made[1:]
                       if info["tflite"] != base_file
                       and mildest[change.kind, change.key, info["tflite"]] == change]


def _sizes(stored):
    return None if stored is None else {n: tuple(v) for n, v in stored.items()}


# ------------------------------------------------------------------------ solving

def _slots(candidates):
    """{(kind, key): [Candidate]}: a plan takes at most one of each slot."""
    slots = {}
    for c in candidates:
        slots.setdefault((c.change.kind, c.change.key), []).append(c)
    return slots


def _log_ratio(base, c, m):
    # Costs combine as products of the one-change ratios: never below zero, right when two
    # changes shrink the same layer (both halves of a conv's channels: 1/4, not 0), and
    # conservative when they shrink different layers. Adding the savings instead predicted
    # 1,248 µs for a plan measured at 2,093 µs, and below zero for larger ones (ResNet-8,
    # reference kernels).
    # The product is raised to a power fitted on the plans measured (`fit_exponents`): on
    # XNNPACK with AMX, ResNet-8's ten one-change ratios multiplied to 0.86 where pruning four
    # groups measured 0.49.
    if not base.cost[m]:
        return 0.0
    return base.exponents.get(m, 1.0) * math.log(max(c.cost[m], 1e-9) / base.cost[m])


def fit_exponents(base, candidates, plans):
    """{metric: a}, the least-squares power of the product rule over `plans` ([(Plan,
    {metric: measured})]): log(measured / base) = a * sum(log one-change ratio)."""
    by_change = {c.change: c for c in candidates}
    out = {}
    for m, v in base.cost.items():
        if not isinstance(v, (int, float)) or not v or m == "flash_bytes":
            continue
        pairs = []
        for plan, measured in plans:
            if m in measured and measured[m] > 0 and all(c in by_change for c in plan.changes):
                x = sum(math.log(max(by_change[c].cost[m], 1e-9) / v) for c in plan.changes)
                pairs.append((x, math.log(measured[m] / v)))
        xx = sum(x * x for x, _ in pairs)
        if xx > 1e-6:
            out[m] = min(max(sum(x * y for x, y in pairs) / xx, 0.25), 4.0)
    return out


def _modelled(base, m):
    return m == "flash_bytes" and base.flash_fit is not None


def _predict(base, chosen, metrics):
    cost = {m: base.cost[m] * math.exp(sum(_log_ratio(base, c, m) for c in chosen))
            for m in metrics if not _modelled(base, m)}
    if any(_modelled(base, m) for m in metrics):
        width = len(base.layers)
        terms = [_layer_terms(base, c) for c in chosen]
        cost["flash_bytes"] = float(_flash(base, *(sum((t[i] for t in terms), np.zeros(width))
                                                   for i in range(3))))
    drop = sum(max(base.accuracy - c.accuracy, 0.0) for c in chosen)
    return drop, cost


def _saves(base, c, metrics):
    """Whether `c` alone lowers a limited metric (else it could only cost accuracy)."""
    drop, cost = _predict(base, [c], metrics)
    return any(cost[m] < _predict(base, [], [m])[1][m] for m in metrics)


def _layer_bits(base, c):
    """(pruned, factorized): bit masks of the base layers whose kernel `c` shrinks by pruning
    (its own channels or its inputs) and of the layer it factorizes (indices beyond 63 fold
    onto lower bits: a false clash only forbids a plan)."""
    if c.change.kind not in ("prune", "factorize") or not base.layers:
        return 0, 0
    names = sorted(base.layers)
    if c.change.kind == "factorize":
        return 0, 1 << names.index(c.change.key) % 63 if c.change.key in names else 0
    sizes = c.layers or {}
    return sum(1 << i % 63 for i, n in enumerate(names)
               if sizes.get(n, (0, 0))[0] < base.layers[n][0]), 0


def _clashes(pruned, factorized):
    """A layer both pruned and factorized: their one-shot losses were measured apart and do
    not add (the digits CNN's plans that did both lost 2-10 points after the fine-tune, the
    one-shot sum had called the factorizations free), so a plan does one or the other."""
    return (np.bitwise_and(pruned, factorized) != 0)


def _scored(base, slots, metrics):
    """Every combination of `slots` (option 0 of each: unchanged) as arrays: (drop, cost
    logs, per-layer terms, modelled, pruned and factorized layer masks)."""
    modelled = [_modelled(base, m) for m in metrics]
    width = len(base.layers) if any(modelled) else 0
    drop, logs = np.zeros(1), np.zeros((1, len(metrics)))
    terms = np.zeros((1, 3, width))  # per layer: kernel-byte log, channel log, LUT entries
    pruned, factorized = np.zeros(1, np.int64), np.zeros(1, np.int64)
    for options in slots:
        bits = np.array([(0, 0)] + [_layer_bits(base, c) for c in options], np.int64)
        pruned = np.bitwise_or(pruned[:, None], bits[None, :, 0]).ravel()
        factorized = np.bitwise_or(factorized[:, None], bits[None, :, 1]).ravel()
        d = np.array([0.0] + [max(base.accuracy - c.accuracy, 0.0) for c in options])
        r = np.array([[0.0] * len(metrics)] + [[0.0 if mod else _log_ratio(base, c, m)
                                                for m, mod in zip(metrics, modelled)]
                                               for c in options])
        drop = (drop[:, None] + d[None, :]).ravel()
        logs = (logs[:, None, :] + r[None, :, :]).reshape(-1, len(metrics))
        if width:
            t = np.array([np.zeros((3, width))] + [np.array(_layer_terms(base, c))
                                                   for c in options])
            terms = (terms[:, None] + t[None]).reshape(-1, 3, width)
    return drop, logs, terms, modelled, pruned, factorized


def _flash_parts(base, terms):
    """The flash model's per-layer parts of many combinations (`_scored` terms): kernel bytes,
    output channels, channels x LUT entries (each (N, layers)) and LUT entries."""
    names = sorted(base.layers)
    weights = np.array([base.layers[n][0] for n in names], dtype=float)
    channels = np.array([base.layers[n][1] for n in names], dtype=float) * np.exp(terms[:, 1])
    table = terms[:, 2]
    return (weights * np.exp(terms[:, 0]), channels, channels * table, table,
            (table > 0).sum(-1))


def _costs_of(base, metrics, logs, parts, outer, modelled):
    """Costs of the inner combinations (`logs`, flash `parts`) with one outer choice (its
    log terms `outer`). The flash model is linear in per-layer bytes and channels, and the
    outer choice scales each layer's: matrix-vector products, not an exp per layer and
    combination (the digits CNN's 26 million combinations: 0.6 s, against 4.2 s)."""
    cost = np.array([base.cost[m] for m in metrics], dtype=float) * np.exp(logs)
    if any(modelled):
        kernel_bytes, channels, channel_entries, entries, luts = parts
        lw, lc, table = outer
        scale_w, scale_c = np.exp(lw), np.exp(lc)
        luts = luts + (entries[:, table > 0] == 0).sum(-1)  # the outer choice's new tables
        fixed, per_byte, per_channel, per_lut, per_entry = base.flash_fit
        flash = (fixed + per_byte * (kernel_bytes @ scale_w) + per_channel * (channels @ scale_c)
                 + per_lut * luts
                 + per_entry * (channel_entries @ scale_c + channels @ (scale_c * table)))
        for j, mod in enumerate(modelled):
            if mod:
                cost[:, j] = flash
    return cost


def solve(base, candidates, limits, exclude=()):
    """The Plan of least predicted loss whose predicted cost is within `limits` ({metric:
    bound}) and whose key is not in `exclude`, or None if none is predicted to fit.

    Options that save nothing the limits count are left out first. The rest is scored
    exactly, in chunks of CHUNK combinations (the last slots vectorized, the first looped);
    beyond EXHAUSTIVE_LIMIT combinations, greedily."""
    metrics = list(limits)
    slots = [[c for c in s if _saves(base, c, metrics)] for s in _slots(candidates).values()]
    slots = [s for s in slots if s]
    sizes = [len(s) + 1 for s in slots]
    if math.prod(sizes) > EXHAUSTIVE_LIMIT:
        return _greedy(base, slots, limits, metrics, exclude)
    split = len(slots)
    while split > 0 and math.prod(sizes[split - 1:]) <= CHUNK:
        split -= 1
    outer, inner = slots[:split], slots[split:]
    drop_i, logs_i, terms_i, modelled, pruned_i, factorized_i = _scored(base, inner, metrics)
    parts = _flash_parts(base, terms_i) if any(modelled) else None
    bound = np.array([limits[m] for m in metrics], dtype=float)
    ranked = []
    for picks in itertools.product(*(range(n) for n in sizes[:split])):
        chosen = [outer[j][i - 1] for j, i in enumerate(picks) if i]
        drop_o, logs_o, terms_o, _, pruned_o, factorized_o = _scored(
            base, [[c] for c in chosen], metrics)
        # (the outer choice is one combination: its last entry, every option taken)
        cost = _costs_of(base, metrics, logs_i + logs_o[-1], parts, terms_o[-1], modelled)
        drop = drop_i + drop_o[-1]
        clash = _clashes(pruned_i | pruned_o[-1], factorized_i | factorized_o[-1])
        fits = np.flatnonzero((cost <= bound).all(axis=1) & ~clash)
        # Equal predicted losses (losses count validation images: ties are common): the
        # plan furthest under the budget goes first. It is the faster (or smaller) result,
        # and a plan at the budget's edge is the one whose measurement misses: on reference,
        # the two ResNet-8 plans of 1.59 predicted point asked first, nearest the budget
        # (1% and 8% under), both measured over it (two previews spent).
        used = (cost[fits] / bound).sum(axis=1)
        for k in fits[np.lexsort((used, drop[fits]))][:len(exclude) + 1]:
            ranked.append((drop[k], (cost[k] / bound).sum(), picks, k))
    inner_shape = sizes[split:]
    for _, _, picks, k in sorted(ranked, key=lambda r: r[:2]):
        chosen = [outer[j][i - 1] for j, i in enumerate(picks) if i]
        chosen += [inner[j][i - 1] for j, i in
                   enumerate(np.unravel_index(k, inner_shape) if inner_shape else ()) if i]
        plan = _plan(base, chosen, metrics)
        if plan.key not in exclude:
            return plan
    return None


def _plan(base, chosen, metrics):
    drop, cost = _predict(base, chosen, metrics)
    return Plan(tuple(c.change for c in chosen), drop, cost)


def _fits(cost, limits):
    return all(cost[m] <= bound for m, bound in limits.items())


def _greedy(base, slots, limits, metrics, exclude):
    """Raise one slot's setting at a time, the least loss per budget excess removed."""
    state = [0] * len(slots)

    def chosen_of(s):
        return [slots[j][i - 1] for j, i in enumerate(s) if i]

    while True:
        plan = _plan(base, chosen_of(state), metrics)
        if _fits(plan.predicted_cost, limits) and plan.key not in exclude:
            return plan
        cost = plan.predicted_cost
        excess = {m: max(cost[m] - limits[m], 0.0) for m in metrics}
        moves = []
        for j, i in enumerate(state):
            for k in range(i + 1, len(slots[j]) + 1):  # options go from mild to strong
                trial_chosen = chosen_of(state[:j] + [k] + state[j + 1:])
                bits = [_layer_bits(base, c) for c in trial_chosen]
                if _clashes(np.bitwise_or.reduce([0] + [p for p, _ in bits]),
                            np.bitwise_or.reduce([0] + [f for _, f in bits])):
                    continue
                trial = _plan(base, trial_chosen, metrics)
                gain = sum(min(cost[m] - trial.predicted_cost[m], excess[m]) / limits[m]
                           for m in metrics if excess[m] > 0)
                if gain > 0:
                    moves.append(((trial.predicted_drop - plan.predicted_drop) / gain, j, k))
        if not moves:
            return None
        _, j, k = min(moves)
        state[j] = k


def strongest(base, candidates, metrics):
    """The Plan with every slot at its cheapest measured setting."""
    cheapest = []
    for options in _slots(candidates).values():
        cheapest.append(min(options, key=lambda c: sum(c.cost[m] / max(base.cost[m], 1e-9)
                                                        for m in metrics)))
    return _plan(base, cheapest, metrics)


def best_reachable(base, candidates, metrics):
    """(drop, cost) predicted with every slot at its cheapest setting (for error messages)."""
    plan = strongest(base, candidates, metrics)
    return plan.predicted_drop, plan.predicted_cost
