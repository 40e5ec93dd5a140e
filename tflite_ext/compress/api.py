"""`compress(model, train, val, budget, target)`: the recipe found by measuring on the target.

1. The unchanged model, converted to int8, is measured on the target (the base).
2. Every single change (a dependency group pruned, a layer factorized, a kernel clustered for
   a LUT) is applied alone, one shot; each one-change model's validation accuracy and cost on
   the target are measured (`search.measure_candidates`).
3. `search.solve` picks the changes: least predicted accuracy loss within the budget.
4. The plan applied in one shot is measured on the target: if its shapes miss, the budget
   the solver sees tightens by what the prediction missed by, and it solves again (no
   fine-tune spent). The first `shortlist` plans that fit are kept: the first (least
   predicted loss) is fine-tuned; if it falls short, the others are ranked by a short run of
   the real pipeline before theirs.
5. The real pipeline: `prune(group_sparsity=...)` fine-tuned with the float model teaching
   (distillation), `strip`, BatchNormalization re-estimated, `factorize`, QAT with
   clustering in one taught fit, full-int8 conversion (verified), the LUT copy (proven to
   give the int8 outputs in TFLM).
6. The result is measured on the target. A cost miss tightens as in 4; an accuracy miss
   tries the next plan; at most `max_rounds` fine-tunes.

Every measurement is cached in `out_dir/cache.jsonl`, every fine-tuned plan kept in
`out_dir/runs/`: an interrupted search run again continues where it stopped.

Example:
    >>> result = compress(model, (x_train, y_train), (x_val, y_val),
    ...                   Budget.parse(latency="40us"), target="host", out_dir="build/c")
    >>> result.measured["latency_us"], result.accuracy_drop
    (38.1, 0.0037)
"""
import dataclasses
import functools
import json
import os
import time

import numpy as np

from tflite_ext import distillation, pruning
from tflite_ext.bench import variants
from tflite_ext.compress import search, shared_run
from tflite_ext.compress.budget import Budget
from tflite_ext.compress.cache import Cache, fingerprint
from tflite_ext.compress.targets import RETIME_PAUSE_S, Target, get_target
from tflite_ext.errors import InputError
from tflite_ext.files import atomic_write, ensure_writable_dir
from tflite_ext.functional import as_functional


class BudgetError(InputError):
    """No plan met the budget: the message has the best reachable values."""


@dataclasses.dataclass
class Result:
    """What `compress` made and measured."""

    model: object            # the final Keras model (stripped; QAT if qat=True)
    flatbuffer: bytes        # its verified full-int8 .tflite
    plan: dict               # the JSON that reproduces it (plan.json)
    measured: dict           # cost on the target, plus "macs"
    accuracy: float          # int8 accuracy on the validation data
    base_accuracy: float     # the unchanged model's int8 accuracy there
    report: dict
    conversion: object = None   # the `convert.ConversionResult` (with `.lut` when clustered)

    @property
    def deployed(self):
        """What the target runs and `measured` measured: the LUT copy when clustered."""
        lut = getattr(self.conversion, "lut", None)
        return lut.flatbuffer if lut is not None else self.flatbuffer

    @property
    def accuracy_drop(self):
        return self.base_accuracy - self.accuracy


def check_data(model, data, name):
    """(x, y) as arrays whose samples fit the model's input; one-line errors otherwise."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.exists(data):
            raise InputError(f"{name} file does not exist. Received: {name}={str(data)!r}")
        with np.load(data) as f:
            if "x" not in f or "y" not in f:
                raise InputError(f"{name} must be an .npz with arrays 'x' and 'y'. Received: "
                                 f"arrays {sorted(f.files)}")
            data = (f["x"], f["y"])
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputError(f"{name} must be (x, y) arrays or an .npz with 'x' and 'y'. "
                         f"Received: {name} of type {type(data).__name__}")
    x, labels = np.asarray(data[0], np.float32), np.asarray(data[1])
    y = labels.reshape(-1)
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(e is not None and e != d
                                          for e, d in zip(expected, x.shape[1:])):
        raise InputError(f"{name} samples must have the model's input shape {expected}. "
                         f"Received: {name} x of shape {x.shape}")
    classes = model.outputs[0].shape[-1]
    if labels.ndim == 2 and labels.shape == (len(x), classes) and len(x) > 1:
        raise InputError(f"{name} labels must be class indices, not one-hot rows: pass "
                         f"y.argmax(-1). Received: {name} y of shape {labels.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"{name} needs as many labels as samples (> 0). Received: "
                         f"{len(x)} samples, {len(y)} labels")
    if not np.isfinite(x).all():
        raise InputError(f"{name} x must be finite. Received: {int((~np.isfinite(x)).sum())} "
                         f"NaN or infinite values")
    whole = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all())
    if not whole or y.min() < 0 or (classes and y.max() >= classes):
        shown = (f"values {y.min():g} to {y.max():g}" if y.dtype.kind in "iuf"
                 else f"dtype {y.dtype}")
        indices = f"0 to {classes - 1} (the model's {classes} outputs)" if classes else "0, 1, ..."
        raise InputError(f"{name} labels must be whole class indices {indices}. Received: "
                         f"{name} y {shown}")
    return x, y.astype(np.int64)


def _split(train):
    from tflite_ext.tasks import Split

    x, y = train
    return Split(x, y, x[:0], y[:0], int(y.max()) + 1)


def _steps(x, epochs):
    return epochs * -(-len(x) // 32)


# Blocks the plan removes go before the fine-tune, at once: ramped with the channels, the
# last of a residual branch vanished at the ramp's end and the fit diverged (ResNet-8 with three
# blocks removed fell from 0.97 to 0.19 validation accuracy at that step).
PIPELINE = "v3"  # names the fine-tuned runs and short runs cached: a new pipeline, new runs
RESOLVE_ABOVE = 0.01  # one-shot losses above a point get a short fine-tune before they count
RESOLVE_ROUNDS = 6    # fitting plan -> short runs of its damaging changes -> solve, per shortlist
# In the short run the channel changes share (`shared_run`), each change and the unchanged
# model train for this fraction of one short run's steps (ResNet-8: an epoch, 32 steps, each).
# ResNet-8's `host` search on an AMD EPYC spent 72 s on six short runs of their own; shared,
# 21 s on five changes. At a sixth, its plans were no better (slower than the hand recipe on
# host and Ethos-U; at a third, on host only), for 5 s less.
SHARED_SLOT_FRACTION = 1 / 3
# Adam's default, the rate both reference models were trained at. Fine-tuned at 5e-4 (the
# earlier default), the same plans lost more: mean int8 test accuracy over seeds 0-2 of ResNet-8
# with two blocks removed 0.9710 -> 0.9827 at 1e-3, the hand recipe 0.9802 -> 0.9876, a
# digits CNN plan at 99x 0.9796 -> 0.9876 (1.5e-3 and 2e-3 about the same again).
LEARNING_RATE = 1e-3


def _fine_tune(model, plan, train, *, epochs, learning_rate, round_to, layers, log):
    """Removed blocks stripped first (BN re-estimated); the other groups' pruning ramped
    during a distilled fit; strip, BN re-estimated."""
    x, _ = train
    removed = {k: v for k, v in plan.of("prune").items() if v >= 1.0}
    rest = {k: v for k, v in plan.of("prune").items() if v < 1.0}
    start = model
    if removed:
        start = search.one_shot(model, removed, layers=layers, round_to=round_to, x=x[:512])
    if not rest:
        variants.fit(start, _split(train), epochs=epochs, learning_rate=learning_rate,
                     teacher=model, label="  fine-tune" if log else None, log=log or print)
        # The moving statistics lag the weights the fit moved: ResNet-8 without s2a scored
        # 0.11 after two epochs, 0.94 once they were re-estimated.
        pruning.recalibrate_batch_norm(start, x)
        return start
    top = search.partial_top(rest)
    end = max(1, _steps(x, epochs) // 2)
    schedule = pruning.PolynomialDecay(0.0, top, 0, end, frequency=max(1, end // 4))
    student = pruning.prune(start, schedule, layers=layers, round_to=round_to,
                            group_sparsity={**rest, ".*": 0.0})
    variants.fit(student, _split(train), epochs=epochs, learning_rate=learning_rate,
                 teacher=model, callbacks=[pruning.PruningCallback()],
                 label="  fine-tune" if log else None, log=log or print)
    small = pruning.strip(student)
    pruning.recalibrate_batch_norm(small, x)
    return small


def _quantization_aware(model, teacher, train, epochs, log, clusters=None):
    """QAT (and clustering of {layer: clusters}, in the same fit) taught by `teacher`."""
    from tflite_ext import clustering
    from tflite_ext.quantization import FreezeQuantization, calibrate, quantize_model

    x, _ = train
    qat = quantize_model(model)
    calibrate(qat, x[:512])
    callbacks = [FreezeQuantization(freeze_after_step=int(0.6 * _steps(x, epochs)))]
    if clusters:
        qat = clustering.cluster(qat, **search.cluster_arguments(model, clusters))
        callbacks = [clustering.ClusteringCallback(max(1, _steps(x, epochs) // 20))]
    variants.fit(qat, _split(train), epochs=epochs, learning_rate=1e-4, teacher=teacher,
                 callbacks=callbacks, label="  QAT" + (" + cluster" if clusters else "")
                 if log else None, log=log or print)
    return clustering.strip_clustering(qat) if clusters else qat


def _pipeline(model, plan, train, *, epochs, learning_rate, qat, round_to, layers, log,
              seed=0):
    """The real pipeline for one plan: prune (distilled fine-tune) -> strip -> factorize ->
    QAT and cluster (one distilled fit) -> an ordinary or QAT Keras model.

    Every run starts from `seed`: plans are compared on the same batch order (their short
    runs differ by the plan, not by the shuffle), and a search run again repeats itself."""
    import keras

    keras.utils.set_random_seed(seed)
    small = model
    if plan.of("prune"):
        small = _fine_tune(model, plan, train, epochs=epochs, learning_rate=learning_rate,
                           round_to=round_to, layers=layers, log=log)
    if plan.of("factorize"):
        small = search.factorized(small, plan.of("factorize"))
        if not (qat or plan.of("cluster")):  # else the QAT fit below recovers it
            variants.fit(small, _split(train), epochs=max(1, epochs // 3),
                         learning_rate=learning_rate / 5, teacher=model,
                         label="  factorized" if log else None, log=log or print)
            pruning.recalibrate_batch_norm(small, train[0])  # as after the fine-tune
    if qat or plan.of("cluster"):
        small = _quantization_aware(small, model, train, max(2, epochs // 3), log,
                                    clusters=plan.of("cluster"))
    return small


def compress(model, train_data, val_data, budget, target="host", *, max_accuracy_drop=1.0,
             out_dir="build/compress", epochs=10, learning_rate=LEARNING_RATE, qat=False,
             round_to=8, settings=search.SETTINGS, rank_fractions=(),
             clusters=search.CLUSTERS, layers=None, max_rounds=3, shortlist=3, binary=None,
             seed=0, log=print):
    """Finds and builds the compressed model that meets `budget` on `target`.

    Args:
        model: the trained float Keras model (functional or Sequential), logits out.
        train_data, val_data: (x, y) arrays or .npz paths with 'x' and 'y'. Choices are made
            on `val_data`; keep a test split apart to report.
        budget: a `Budget` (or a dict of its fields); `Budget.parse(latency="0.4x")` bounds
            it by the unchanged model's cost as this search measures it.
        target: a `Target` or its name (`targets.get_target`): "host", "host:2",
            "reference", "micro", "ethos-u55-128", ..., "android[:SERIAL]" (with `binary`).
        max_accuracy_drop: points of int8 validation accuracy the result may lose against
            the unchanged int8 model.
        epochs, learning_rate: the fine-tune of each plan (Adam, batch 32, distilled); the
            QAT and clustering fit after it runs at 1e-4. A model pretrained on much more data
            at a lower rate may want a lower one here.
        qat: fine-tune the stripped model with QAT before conversion (clustering always
            trains with QAT).
        round_to: kept channel counts are multiples of this.
        settings: the sparsities each group is tried at (1.0 is added for removable blocks).
        rank_fractions: the fractions of full rank each factorizable layer is tried at,
            e.g. `search.RANK_FRACTIONS` (0.5, 0.25); () (the default) leaves factorization
            out: in the searches measured, plans with factorizations lost more after the
            fine-tune than their one-shot and short-run losses said (ResNet-8 on host: 1.2-5.2
            points where pruning alone lost 0.8; measured before the factorized fit
            re-estimated BatchNormalization).
        clusters: the shared values per kernel each clusterable layer is tried at, on
            targets that run LUT-compressed weights (`micro`); () leaves clustering out.
        max_rounds: plans fine-tuned at most. Before each, the plan is applied in one shot
            and measured on the target: a plan whose shapes miss the budget costs no
            fine-tune.
        shortlist: plans that fit in one shot kept for the full fine-tunes: the first is
            fine-tuned; if it falls short, the others are ranked by a short fine-tune
            (epochs / 5, NetAdapt's short-term fine-tune) before theirs.
        seed: every fine-tune, short or full, starts from `keras.utils.set_random_seed(seed)`
            (which sets Python's, NumPy's and the backend's global seeds).

    Returns:
        A `Result`; `out_dir` holds model.keras, model.tflite (model.lut.tflite when
        clustered), plan.json, report.json, report.md, accuracy_vs_latency.png /
        accuracy_vs_size.png and cache.jsonl.

    Raises:
        InputError: bad data, budget or target (one line each).
        BudgetError: no plan met the budget; the message has the best reached.
    """
    start = time.perf_counter()
    model, _ = as_functional(model, "compress() model")
    distillation.check_logits(model, "compress() model")  # it teaches every fine-tune
    budget = Budget.of_any(budget)
    train, val = check_data(model, train_data, "train_data"), check_data(model, val_data,
                                                                          "val_data")
    target = target if isinstance(target, Target) else get_target(target, binary=binary)
    if not 0 <= max_accuracy_drop <= 100:
        raise InputError(f"max_accuracy_drop is in points, 0 to 100. Received: "
                         f"max_accuracy_drop={max_accuracy_drop!r}")
    _check_options(settings, rank_fractions, clusters, shortlist, max_rounds, seed, epochs,
                   learning_rate)
    unmeasured = [m for m in budget.metrics() if m != "macs" and m not in target.metrics]
    if unmeasured:
        raise InputError(f"Target {target.name} does not measure {', '.join(unmeasured)}; "
                         f"it measures {', '.join(target.metrics)}")
    ensure_writable_dir(out_dir)
    per_image = 100 / len(val[1])
    if log and max_accuracy_drop < 2 * per_image:
        log(f"note: max_accuracy_drop {max_accuracy_drop:g} point is less than two of the "
            f"{len(val[1])} validation images ({per_image:.2f} point each): one or two images "
            f"decide every plan; a larger validation split decides better")
    cache = Cache(os.path.join(out_dir, "cache.jsonl"))
    # Clustering trains with QAT; where it is a candidate every plan does, so that every file
    # measured is converted the way the result will be.
    qat = qat or bool(clusters and target.lut)
    base, candidates = search.measure_candidates(
        model, train, val, target, cache, settings=settings, rank_fractions=rank_fractions,
        clusters=clusters, layers=layers, round_to=round_to, qat=qat, log=log)
    base_accuracy = variants.accuracy(base.tflite, *val)
    if log:
        log(f"base: int8 accuracy {base_accuracy:.4f}, " + ", ".join(
            f"{k} {v:,.1f}" for k, v in base.cost.items() if isinstance(v, (int, float))))
    if budget.fractions:  # bounds from this measurement, the one the search predicts from
        relative = budget
        budget = budget.of(base.cost)
        if log:
            log(f"budget: {relative}: {budget}")
    limits = budget.limits()
    search_state = _Search(model, train, val, target, cache, base, budget, layers, round_to,
                           qat, candidates, short_epochs=max(1, epochs // 5),
                           learning_rate=learning_rate, seed=seed)
    tried, margin, rejected, result, tuned = [], dict(limits), set(), None, 0
    while result is None and tuned < max_rounds:
        plans = _fitting_plans(search_state, candidates, limits, margin, rejected,
                               shortlist, tried, log)
        if not plans:
            break
        # The plan of least predicted loss (its damaging changes known by short runs) is
        # fine-tuned at once; only if it falls short are the others ranked by a short run of
        # the real pipeline (NetAdapt's short-term fine-tune) before theirs. Ranked first,
        # it had won all 7 searches of ResNet-8 and the digits CNN measured on an Intel Xeon
        # with AMX, and the ranking had cost 7-28 s of each.
        first = plans[0]
        while plans and tuned < max_rounds:
            plan = plans.pop(0)
            if log:
                log(f"fine-tuning plan {plan.key}")
            small, converted, _, measured, acc = _build(
                model, plan, train, val, target, out_dir, base, epochs=epochs,
                learning_rate=learning_rate, qat=qat, round_to=round_to, layers=layers,
                seed=seed, log=log, budget=budget)
            tuned += 1
            misses = budget.misses(measured)
            drop = (base_accuracy - acc) * 100
            tried.append(_round("fine-tuned", plan, measured, acc, drop, misses))
            if log:
                log(f"  measured: {_costs(measured)}; int8 accuracy {acc:.4f} "
                    f"({'lost' if drop >= 0 else 'gained'} {abs(drop):.2f} point)"
                    + (f"; misses {'; '.join(misses)}" if misses else "; fits"))
            if not misses and drop <= max_accuracy_drop:
                result = (plan, small, converted, measured, acc)
                break
            rejected.add(plan.key)  # one-shot losses rank plans loosely: try the next best
            margin = _tightened(margin, limits, plan.predicted_cost, measured)
            if plan is first and plans and tuned < max_rounds:  # (one left: ranked too)
                # Ranked by a short run of the real pipeline, not one-shot losses; a plan whose
                # short run scores below the one that just fell short would fall shorter: not
                # fine-tuned (ResNet-8 seed 1 on host: the shortlist's others scored 0.83 and
                # 0.10, their full runs lost 3.6 and 77 points), the next shortlist instead.
                score = {p.key: search_state.quick_accuracy(p, log=log) for p in [plan, *plans]}
                rejected.update(p.key for p in plans if score[p.key] < score[plan.key])
                plans = sorted((p for p in plans if score[p.key] >= score[plan.key]),
                               key=lambda p: -score[p.key])
    report = _report(model, budget, target, base, base_accuracy, candidates, tried,
                     time.perf_counter() - start, search_state)
    _write_outputs(out_dir, report, base, base_accuracy, candidates, tried)
    if result is None:
        raise BudgetError(_miss_message(budget, base, candidates, tried, max_accuracy_drop,
                                        out_dir))
    plan, small, converted, measured, acc = result
    plan_json = _plan_json(plan, small, epochs, learning_rate, qat, round_to, layers, target,
                           budget, seed)
    small.save(os.path.join(out_dir, "model.keras"))
    converted.save(os.path.join(out_dir, "model.tflite"))
    atomic_write(os.path.join(out_dir, "plan.json"), json.dumps(plan_json, indent=2).encode())
    return Result(small, converted.flatbuffer, plan_json, measured, acc, base_accuracy, report,
                  converted)


def _check_options(settings, rank_fractions, clusters, shortlist, max_rounds, seed, epochs,
                   learning_rate):
    """One-line errors for search settings out of range, before anything is measured (a
    typo found after the candidates were measured cost a reviewer 8 minutes on MobileNetV2)."""
    for name, values, ok, what in (
            ("settings", settings, lambda v: 0 < v < 1, "sparsities between 0 and 1"),
            ("rank_fractions", rank_fractions, lambda v: 0 < v < 1, "fractions between 0 and 1"),
            ("clusters", clusters, lambda v: v == int(v) and 2 <= v <= 128,
             "integers from 2 to 128")):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
               or not ok(v)]
        if bad:
            raise InputError(f"{name} must be {what}. Received: {name}={tuple(values)!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not \
            0 < learning_rate < 1:  # NaN and inf fail this too
        raise InputError(f"learning_rate must be a number between 0 and 1 (Adam's rate, e.g. "
                         f"1e-3). Received: learning_rate={learning_rate!r}")
    for name, value in (("shortlist", shortlist), ("max_rounds", max_rounds),
                        ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1. Received: {name}={value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0. Received: seed={seed!r}")


@dataclasses.dataclass
class _Search:
    """What previews need: the one-shot plan measured beside the base, cached."""

    model: object
    train: tuple
    val: tuple
    target: Target
    cache: Cache
    base: search.Candidate
    budget: Budget
    layers: object
    round_to: int
    qat: bool
    candidates: list = dataclasses.field(default_factory=list)
    short_epochs: int = 1     # of the short fine-tunes (NetAdapt's short-term fine-tune)
    learning_rate: float = LEARNING_RATE
    seed: int = 0
    # {plan key: (plan, measured, layer sizes)} of every plan previewed: what the predictions
    # are refitted on
    previewed: dict = dataclasses.field(default_factory=dict)
    anchored: bool = False  # the all-strongest plan has been measured
    recovered: dict = dataclasses.field(default_factory=dict)  # {Change: after a short run}
    reference: dict = dataclasses.field(default_factory=dict)  # {Change: the unchanged, same run}

    @functools.cached_property
    def model_key(self):
        """The model's fingerprint (its config and every weight hashed): once, not per key."""
        return fingerprint(self.model)

    def preview(self, plan):
        # "preview2": of the file without a signature (`search.int8`), its flash corrected
        key = (f"preview2:{self.target.key}:{self.model_key}:{plan.key}:{self.round_to}"
               f"{':qat' if self.qat else ''}")
        if key not in self.cache:
            small, _, fb = search.one_shot_plan(self.model, plan, self.train[0],
                                             layers=self.layers, round_to=self.round_to,
                                             qat=self.qat)
            # timed once: a preview that misses costs no fine-tune (it may be asked again
            # with the margin tightened), and near misses are common (a second each retimed)
            cost = search.with_signature(measure_beside(self.target, fb, self.base),
                                         self.base.signature_bytes)
            self.cache.put(key, dict(cost, macs=pruning.count_macs(small),
                                     layers=search.layer_sizes(small)))
        measured = dict(self.cache.get(key))
        layers = measured.pop("layers", None)
        self.previewed[plan.key] = (plan, measured, layers)
        done = list(self.previewed.values())
        self.base.exponents = search.fit_exponents(self.base, self.candidates,
                                                   [(p, m) for p, m, _ in done])
        if self.base.flash_fit is not None:
            self.base.flash_fit = search.fit_flash(self.base, self.candidates, [
                (self.sizes_of(p), search.plan_bits(p), m["flash_bytes"])
                for p, m, sizes in done if sizes and "flash_bytes" in m])
        return measured

    def quick_accuracy(self, plan, log=None):
        """Validation accuracy of `plan` after a short run of the real pipeline (cached)."""
        key = (f"quick:{PIPELINE}:{self.model_key}:{plan.key}:{self.short_epochs}:"
               f"{self.learning_rate}:{self.qat}:{self.round_to}:seed{self.seed}")
        if key not in self.cache:
            small = _pipeline(self.model, plan, self.train, epochs=self.short_epochs,
                              learning_rate=self.learning_rate, qat=self.qat,
                              round_to=self.round_to, layers=self.layers, log=None,
                              seed=self.seed)
            self.cache.put(key, variants.accuracy(small, *self.val))
        if log:
            log(f"  {plan.key}: {self.cache.get(key):.4f} after {self.short_epochs} epoch(s)")
        return self.cache.get(key)

    def resolve(self, candidates, plan, log=None):
        """Gives each damaging change of `plan` (one-shot loss above RESOLVE_ABOVE) its
        accuracy after a short run (`short_runs`, cached); whether any was new. One-shot
        losses saturate: a layer pruned by 7/8 is near chance in one shot, whether it recovers
        or not (the digits CNN's conv2: 0.60 one shot, 0.98 after 3 epochs).

        A removed block is near chance one shot too, and a short run tells nothing there: it
        falls before it recovers (ResNet-8 without s2a: 0.37 one shot, 0.16 after one epoch,
        0.79 after six; plans without s1a and s2a reach 0.98 after the full 15). It counts as
        its group at the strongest channel setting measured does after its short run."""
        asked = self.unresolved(candidates, plan)
        new = list(dict.fromkeys(proxy for _, proxy in asked if proxy not in self.recovered))
        for proxy, (accuracy, reference) in (self.short_runs(new, log) if new else {}).items():
            self.recovered[proxy], self.reference[proxy] = accuracy, reference
        for change, proxy in asked:
            self.recovered[change] = self.recovered[proxy]
            self.reference[change] = self.reference[proxy]
            if log:
                log(f"  {change.label}: {_accuracy_of(candidates, change):.4f} one shot, "
                    f"{self.recovered[change]:.4f} after its short run (the unchanged model "
                    f"{self.reference[change]:.4f} in the same run)"
                    + (f" (as {proxy.label})" if proxy != change else ""))
        return bool(asked)

    def short_runs(self, changes, log=None):
        """{change: (validation accuracy after a short run, the unchanged model's in that
        run)}, cached. The channel changes share one run (`shared_run.shared_short_run`,
        SHARED_SLOT_FRACTION); each other change (factorize, cluster) gets a short run of the
        real pipeline, beside one of the unchanged model."""
        channels = sorted((c for c in changes if c.kind == "prune"), key=lambda c: c.label)
        out = {}
        if channels:
            short = _steps(self.train[0], self.short_epochs)
            steps = max(1, round(short * SHARED_SLOT_FRACTION))
            key = (f"shared:{self.model_key}:{','.join(c.label for c in channels)}:{steps}:"
                   f"{self.learning_rate}:{self.round_to}:seed{self.seed}")
            if key not in self.cache:
                if log:
                    log(f"  one short run shared by {len(channels)} channel change(s) and the "
                        f"unchanged model, {steps} steps each")
                reference, scores = shared_run.shared_short_run(
                    self.model, channels, _split(self.train), self.val, steps_per_slot=steps,
                    learning_rate=self.learning_rate, layers=self.layers,
                    round_to=self.round_to, seed=self.seed)
                self.cache.put(key, {"reference": reference,
                                     **{c.label: scores[c] for c in channels}})
            got = self.cache.get(key)
            out.update((c, (got[c.label], got["reference"])) for c in channels)
        for change in changes:
            if change.kind != "prune":
                out[change] = (self.quick_accuracy(search.Plan((change,), 0.0, {})),
                               self.quick_accuracy(search.Plan((), 0.0, {})))
        return out

    def unresolved(self, candidates, plan):
        """[(change, the change whose short run stands for it)] of `plan`'s damaging changes
        that have no short run yet (`resolve`)."""
        out = []
        for change in plan.changes:
            if change in self.recovered:
                continue
            proxy = change
            if change.kind == "prune" and change.setting >= 1.0:
                proxy = max((c.change for c in self.candidates if c.change.kind == "prune"
                             and c.change.key == change.key and c.change.setting < 1.0),
                            key=lambda c: c.setting, default=None)
                if proxy is None:
                    continue
            elif self.base.accuracy - _accuracy_of(candidates, change) <= RESOLVE_ABOVE:
                continue
            out.append((change, proxy))
        return out

    def sizes_of(self, plan):
        """{layer: (kernel weights, channels)} of a previewed plan's model (None if not
        previewed), as tuples: a preview read back from cache.jsonl has lists."""
        return search._sizes(self.previewed.get(plan.key, (None, None, None))[2])

    def same_model(self, a, b):
        """Whether previewed plans `a` and `b` build the same layer sizes at the same bits
        (settings that round to the same channel counts)."""
        sizes = self.sizes_of(a)
        return sizes is not None and sizes == self.sizes_of(b) and \
            search.plan_bits(a) == search.plan_bits(b)

    def adjusted(self, candidates):
        """`candidates`, a resolved change's loss the one after its short run (against the
        unchanged model in the same run)."""
        top = self.base.accuracy
        return [dataclasses.replace(c, accuracy=min(top, top - self.reference[c.change]
                                                    + self.recovered[c.change]))
                if c.change in self.recovered else c for c in candidates]


def _fitting_plans(state, candidates, limits, margin, rejected, count, tried, log):
    """Up to `count` plans of least predicted loss whose shapes, built in one shot, fit the
    budget on the target; a plan that misses is rejected, and the predictions refitted on
    it (no fine-tune spent).

    Only a plan that fits pays for short runs, and only the first found: a change of it whose
    one-shot loss is above RESOLVE_ABOVE then counts by its loss after a short run
    (`_Search.resolve`), and the solver asks again (at most RESOLVE_ROUNDS times). Resolving
    before the cost check spent four of ResNet-8's short runs (90 s on host) on plans that then
    missed the latency.

    Each plan found bans its most damaging change from the next ones: the short fine-tunes
    that rank them then compare different structures, not one plan and its near copies
    (ResNet-8 on host: three plans removing the same two blocks, one with the stem pruned by
    a quarter too)."""
    base, found, banned, spare = state.base, [], set(), []
    resolved, recorded, fitting_anchor = 0, set(), None

    def allowed():
        """The candidates not banned, each at its loss after a short run where it has one."""
        return state.adjusted(c for c in candidates if c.change not in banned)

    def solved():
        return search.solve(base, allowed(), margin,
                            exclude=rejected | {p.key for p in found + spare})

    for _ in range(4 * count + RESOLVE_ROUNDS):
        plan = solved()
        if plan is None and not state.anchored:
            # The predictions were fitted near the base (or on one plan that missed): measure
            # the far end once (every change at its strongest, in one shot), refit, ask again.
            state.anchored = True
            anchor = search.strongest(base, candidates, list(limits))
            try:
                shapes = state.preview(anchor)
            except InputError:
                shapes = None
            if shapes is not None:
                misses = state.budget.misses(shapes)
                recorded.add(anchor.key)
                tried.append(_round("preview", anchor, shapes, None, None, misses))
                fitting_anchor = None if misses else anchor
            plan = solved()
        if plan is None and fitting_anchor is not None and fitting_anchor.key not in (
                rejected | {p.key for p in found + spare}):
            # Measured, the far end is itself a plan: it may fit where the products of noisy
            # one-change ratios said nothing could (MobileNetV2 on `reference`: 615 µs
            # measured, 2,672 predicted, against 889)
            plan = fitting_anchor
        if plan is None:
            break
        if log:
            log(f"plan {plan.key}; predicted " + ", ".join(
                f"{k} {v:,.1f}" for k, v in plan.predicted_cost.items())
                + f", predicted loss {plan.predicted_drop * 100:.2f} point")
        try:
            shapes = state.preview(plan)
        except InputError as e:  # e.g. clustered tensors too small for a LUT to pay
            tried.append(_round("refused", plan, {}, None, None, [str(e)]))
            rejected.add(plan.key)
            if log:
                log(f"  refused: {e}")
            continue
        misses = state.budget.misses(shapes)
        if plan.key not in recorded:  # a plan can come back after a short run: once
            recorded.add(plan.key)
            tried.append(_round("preview", plan, shapes, None, None, misses))
        if log:
            log(f"  in one shot it measures {_costs(shapes)}"
                + (f"; misses {'; '.join(misses)}" if misses else "; fits"))
        if misses:  # the shapes are the plan's: it can never fit; the predictions have
            rejected.add(plan.key)  # just been refitted on it (`_Search.preview`)
            continue
        if any(state.same_model(plan, kept) for kept in found + spare):
            rejected.add(plan.key)  # its settings round to a model already kept
            continue
        pool = allowed()
        # Only the first plan's changes get short runs of their own: each other plan of the
        # shortlist is ranked (if needed) by one short run of itself, which costs one run, not one
        # per damaging change (ResNet-8 on host: 73 s on the four changes of a second plan
        # whose own short run then scored 0.77 against the first's 0.96).
        if not found and resolved < RESOLVE_ROUNDS and state.resolve(pool, plan, log):
            resolved += 1  # its damaging changes count by their short runs now: ask again
            continue       # (its measurement is cached if it comes back)
        # The predictions were just refitted on this plan: if they now find a plan of less
        # predicted loss (this one was needed only by a cost prediction that was too high:
        # ResNet-8 on host added two factorizations for 61.2 predicted, 53.9 measured), that
        # one is previewed first and this one kept in reserve.
        # (Only a plan whose losses are all known that way: one still to be resolved may
        # look better for its one-shot losses alone, and a spared plan is not asked again.)
        better = solved()
        if better is not None and better.key != plan.key and len(spare) < count \
                and better.predicted_drop < plan.predicted_drop - 1e-9 \
                and not state.unresolved(pool, better):
            spare.append(plan)
            continue
        found.append(plan)
        if plan.changes:
            pool = state.adjusted(candidates)
            banned.add(min(plan.changes, key=lambda c: _accuracy_of(pool, c)))
        if len(found) == count:
            break
    return found + spare[:count - len(found)]


def _accuracy_of(candidates, change):
    return next(c.accuracy for c in candidates if c.change == change)


def _round(stage, plan, measured, accuracy, drop, misses):
    return {"stage": stage, "plan": plan.key, "arguments": _arguments(plan),
            "predicted": plan.predicted_cost, "predicted_drop_points": plan.predicted_drop * 100,
            "measured": measured, "accuracy": accuracy, "drop_points": drop, "misses": misses}


def _costs(measured):
    return ", ".join(f"{k} {v:,.1f}" for k, v in measured.items() if isinstance(v, (int, float)))


def _tightened(margin, limits, predicted, measured):
    """Asks the prediction for less by the factor it missed by, on each metric it missed."""
    return {m: v * predicted[m] / measured[m] if measured.get(m, 0) > limits[m] else v
            for m, v in margin.items()}


def _arguments(plan):
    """The library calls a plan stands for (ranks as fractions; `_plan_json` resolves them)."""
    out = {}
    if plan.of("prune"):
        out["prune"] = {"sparsity": search.partial_top(plan.of("prune")),
                        "group_sparsity": plan.group_sparsity}
    if plan.of("factorize"):
        out["factorize"] = {"rank_fraction": plan.of("factorize")}
    if plan.of("cluster"):
        out["cluster"] = plan.of("cluster")
    return out


def _plan_json(plan, small, epochs, learning_rate, qat, round_to, layers, target, budget,
               seed):
    """plan.json: prune(...), factorize(...) and cluster(...) arguments that reproduce it."""
    out = {"prune": None, "factorize": None, "cluster": None}
    if plan.of("prune"):
        out["prune"] = {"sparsity": search.partial_top(plan.of("prune")),
                        "group_sparsity": plan.group_sparsity, "round_to": round_to,
                        "layers": None if layers is None else repr(layers)}
    if plan.of("factorize"):
        kernels = {w.path.split("/")[0]: w.shape for w in small.weights
                   if w.path.endswith("kernel")}
        out["factorize"] = {"rank": {n: int(kernels[n + "_svd"][-1]) for n in
                                     plan.of("factorize") if n + "_svd" in kernels},
                            "rank_fraction": plan.of("factorize")}
    if plan.of("cluster"):
        out["cluster"] = search.cluster_arguments(small, plan.of("cluster"))
    out.update(fine_tune={"epochs": epochs, "learning_rate": learning_rate, "distilled": True,
                          "seed": seed,
                          "qat": qat or bool(plan.of("cluster")),
                          # stripped before the fine-tune, the other groups ramped in it
                          "removed_first": sorted(k for k, v in plan.of("prune").items()
                                                  if v >= 1.0)},
               lut=bool(plan.of("cluster")), target=target.name, budget=budget.limits())
    return out


def _build(model, plan, train, val, target, out_dir, base, *, epochs, learning_rate, qat,
           round_to, layers, log, seed=0, budget=None):
    """Fine-tunes (or reloads from out_dir/runs/) one plan; converts; measures on target
    (a near miss of `budget` timed again: `measure_beside`).

    Returns (Keras model, conversion result, deployed flatbuffer, measured, accuracy)."""
    runs = os.path.join(out_dir, "runs")
    os.makedirs(runs, exist_ok=True)
    name = fingerprint((plan.key + f"|{epochs}|{learning_rate}|{qat}|{round_to}|{PIPELINE}"
                        f"|seed{seed}").encode())
    path = os.path.join(runs, f"{name}.keras")
    from tflite_ext import convert

    if os.path.exists(path):  # with tflite_ext's layers registered: a new process resuming
        small = convert.load_model(path)  # a QAT or clustered run has not imported them
    else:
        small = _pipeline(model, plan, train, epochs=epochs, learning_rate=learning_rate,
                          qat=qat, round_to=round_to, layers=layers, log=log, seed=seed)
        if not all(np.isfinite(w).all() for w in small.get_weights()):
            # else the converter reports the NaN kernels as ops that "stay float"
            raise InputError(f"The fine-tune of plan {plan.key} diverged (its weights are NaN "
                             f"or infinite): lower learning_rate (received {learning_rate:g})")
        small.save(path + ".part.keras")
        os.replace(path + ".part.keras", path)

    trained = qat or bool(plan.of("cluster"))  # QAT ranges: no calibration data
    # Written as the target runs them (on `micro`, without names), the LUT copy proven so.
    converted = convert.to_tflite(small, None if trained else train[0][:300],
                                  lut=bool(plan.of("cluster")), lut_data=val[0][:100],
                                  strip_names=getattr(target, "strip_names", False))
    deployed = converted.lut.flatbuffer if converted.lut else converted.flatbuffer
    measured = dict(measure_beside(target, deployed, base, budget),
                    macs=pruning.count_macs(small))
    # LiteRT cannot run the LUT copy; it was proven to give the int8 file's outputs
    return small, converted, deployed, measured, variants.accuracy(converted.flatbuffer, *val)


# A fine-tuned plan's timed latency this close above its bound is timed again (twice, a second
# apart) and the fastest kept: on a 2-core AMD EPYC VM, the same two files timed side by side
# flip between two regimes for seconds at a time (a pruned ResNet-8 at 0.39x and at 0.47x of
# its base), and plans whose fine-tune changed no shape "missed" budgets they had met in one
# shot by 7-15%.
RETIME_WITHIN = 0.2


def measure_beside(target, flatbuffer, base, budget=None):
    """`flatbuffer`'s cost on `target`, its latency timed beside the base model's and scaled to
    the base's first measurement: host load changes between measurements, the ratio holds.
    A timing within RETIME_WITHIN above `budget`'s latency is taken twice more, the least kept.
    """
    def timed():
        both = target.measure({"final": flatbuffer, "base": base.tflite})
        cost = dict(both["final"])
        if "latency_us" in cost and both["base"].get("latency_us"):
            cost["latency_us"] *= base.cost["latency_us"] / both["base"]["latency_us"]
        return cost

    cost = timed()
    bound = None if budget is None else Budget.of_any(budget).latency_us
    for _ in range(2):
        if not (target.timed and bound and isinstance(cost.get("latency_us"), (int, float))
                and bound < cost["latency_us"] < bound * (1 + RETIME_WITHIN)):
            break
        time.sleep(RETIME_PAUSE_S)
        cost["latency_us"] = min(cost["latency_us"], timed()["latency_us"])
    return cost


def _miss_message(budget, base, candidates, tried, max_drop, out_dir):
    # the plot of the bound missed: a flash budget's is accuracy against size
    size = budget.flash_bytes is not None and budget.latency_us is None
    plot = os.path.join(out_dir, "accuracy_vs_size.png" if size else "accuracy_vs_latency.png")
    tuned = [t for t in tried if t["stage"] == "fine-tuned"]
    if tuned:
        best = min(tuned, key=lambda t: (len(t["misses"]), t["drop_points"]))
        reached = ", ".join(f"{k} {v:,.1f}" for k, v in best["measured"].items()
                            if k in budget.limits())
        return (f"No plan met {budget} within {max_drop} point: the closest reached {reached} "
                f"losing {best['drop_points']:.2f} point (plan {best['plan']}); every measured "
                f"candidate is plotted in {plot}")
    limits = budget.limits()
    previews = [t for t in tried if t["stage"] == "preview"]
    if previews:  # the plans measured in one shot all missed: the nearest of them
        best = min(previews, key=lambda t: (len(t["misses"]), sum(
            t["measured"].get(k, v) / v for k, v in limits.items())))
        reached = ", ".join(f"{k} {v:,.1f}" for k, v in best["measured"].items() if k in limits)
        return (f"No plan met {budget}: the closest measured in one shot reached {reached} "
                f"(plan {best['plan']}); every measured candidate is plotted in {plot}")
    _, cost = search.best_reachable(base, candidates, list(limits))
    reached = ", ".join(f"{k} {v:,.1f}" for k, v in cost.items())
    return (f"No plan is predicted to meet {budget}: every measured change at its strongest "
            f"reaches about {reached}; every measured candidate is plotted in {plot}")


def _report(model, budget, target, base, base_accuracy, candidates, tried, seconds, state):
    return {"model": model.name, "target": target.name, "budget": budget.limits(),
            "base": {"int8_accuracy": base_accuracy, "one_shot_accuracy": base.accuracy,
                     "cost": base.cost},
            "candidates": [{"name": c.name, **dataclasses.asdict(c.change),
                            "one_shot_accuracy": c.accuracy, "cost": c.cost,
                            "short_run_accuracy": state.recovered.get(c.change),
                            # the unchanged model's in that short run: the loss is against it
                            "short_run_reference": state.reference.get(c.change)}
                           for c in candidates],
            "rounds": tried, "seconds": seconds, "environment": variants.environment()}


def _write_outputs(out_dir, report, base, base_accuracy, candidates, tried):
    from tflite_ext.bench import report as report_lib

    rows = [{"round": i + 1, "stage": t["stage"], "plan": t["plan"],
             "accuracy": "" if t["accuracy"] is None else t["accuracy"],
             "drop (points)": "" if t["drop_points"] is None else t["drop_points"],
             **{k: v for k, v in t["measured"].items() if isinstance(v, (int, float))},
             "misses": "; ".join(t["misses"]) or "fits"} for i, t in enumerate(tried)]
    columns = [(k, k) for k in dict.fromkeys(k for r in rows for k in r)]
    md = (f"# compress: {report['model']} on {report['target']}\n\nBudget: "
          f"{report['budget']}; base int8 accuracy {base_accuracy:.4f}; "
          f"{len(candidates)} one-change candidates measured (settings that round to the same "
          f"model counted once); {report['seconds']:.0f} s.\n\n"
          + (report_lib.markdown_table(rows, columns) if rows else
             "No plan was measured: none was predicted to meet the budget (every one-change "
             "candidate is in report.json and the plots).\n"))
    report_lib.write_report(out_dir, "report", report, md)
    points = [{"name": "base", "accuracy": base.accuracy,
               "size_bytes": base.cost.get("flash_bytes", 0) or 1,
               "latency_us": base.cost.get("latency_us")}]
    points += [{"name": c.name, "accuracy": c.accuracy,
                "size_bytes": c.cost.get("flash_bytes", 0) or 1,
                "latency_us": c.cost.get("latency_us")} for c in candidates]
    points += [{"name": f"round {i + 1}", "accuracy": t["accuracy"],
                "size_bytes": t["measured"].get("flash_bytes", 0) or 1,
                "latency_us": t["measured"].get("latency_us")} for i, t in enumerate(tried)
               if t["stage"] == "fine-tuned"]
    report_lib.plot_variants(points, out_dir)
