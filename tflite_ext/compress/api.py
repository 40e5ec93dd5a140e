"""`compress(model, train, val, budget, target)`: the recipe found by measuring on the target.

1. The unchanged model, converted to int8, is measured on the target (the base).
2. Every dependency group is pruned alone at a few settings, one shot; each one-change model's
   validation accuracy and cost on the target are measured (`search.measure_candidates`).
3. `search.solve` picks one setting per group: least predicted accuracy loss within the
   budget.
4. The real pipeline: `prune(group_sparsity=plan)` fine-tuned with the float model teaching
   (distillation), `strip`, BatchNormalization re-estimated, optionally QAT, full-int8
   conversion (verified).
5. The result is measured on the target. A miss tightens the budget the solver sees by what
   the prediction missed by, and repeats (at most `max_rounds`).

Every measurement is cached in `out_dir/cache.jsonl`, every fine-tuned plan kept in
`out_dir/runs/`: an interrupted search run again continues where it stopped.

Example:
    >>> result = compress(model, (x_train, y_train), (x_val, y_val),
    ...                   Budget.parse(latency="40us"), target="host", out_dir="build/c")
    >>> result.measured["latency_us"], result.accuracy_drop
    (38.1, 0.0037)
"""
import dataclasses
import json
import os
import time

import keras
import numpy as np

from tflite_ext import pruning
from tflite_ext.bench import variants
from tflite_ext.compress import search
from tflite_ext.compress.budget import Budget
from tflite_ext.compress.cache import Cache, fingerprint
from tflite_ext.compress.targets import Target, get_target
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
    x, y = np.asarray(data[0], np.float32), np.asarray(data[1]).reshape(-1)
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(e is not None and e != d
                                          for e, d in zip(expected, x.shape[1:])):
        raise InputError(f"{name} samples must have the model's input shape {expected}. "
                         f"Received: {name} x of shape {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"{name} needs as many labels as samples (> 0). Received: "
                         f"{len(x)} samples, {len(y)} labels")
    return x, y


def _split(train):
    from tflite_ext.tasks import Split

    x, y = train
    return Split(x, y, x[:0], y[:0], int(y.max()) + 1)


def _fine_tune(model, plan, train, *, epochs, learning_rate, round_to, layers, log):
    """The real pipeline for one plan: prune ramped during a distilled fit, strip, BN."""
    x, y = train
    if not any(plan.choice.values()):
        return model
    top = search.partial_top(plan.choice)
    steps = epochs * -(-len(x) // 32)
    end = max(1, steps // 2)
    schedule = pruning.PolynomialDecay(0.0, top, 0, end, frequency=max(1, end // 4))
    student = pruning.prune(model, schedule, layers=layers, round_to=round_to,
                            group_sparsity=plan.group_sparsity)
    split = _split(train)
    variants.fit(student, split, epochs=epochs, learning_rate=learning_rate, teacher=model,
                 callbacks=[pruning.PruningCallback()],
                 label="  fine-tune" if log else None, log=log or print)
    small = pruning.strip(student)
    pruning.recalibrate_batch_norm(small, x)
    return small


def _quantization_aware(model, teacher, train, epochs, log):
    from tflite_ext.quantization import FreezeQuantization, calibrate, quantize_model

    x, y = train
    qat = quantize_model(model)
    calibrate(qat, x[:512])
    steps = epochs * -(-len(x) // 32)
    split = _split(train)
    variants.fit(qat, split, epochs=epochs, learning_rate=1e-4, teacher=teacher,
                 callbacks=[FreezeQuantization(freeze_after_step=int(0.6 * steps))],
                 label="  QAT" if log else None, log=log or print)
    return qat


def compress(model, train_data, val_data, budget, target="host", *, max_accuracy_drop=1.0,
             out_dir="build/compress", epochs=10, learning_rate=5e-4, qat=False, round_to=8,
             settings=search.SETTINGS, layers=None, max_rounds=3, binary=None, log=print):
    """Finds and builds the compressed model that meets `budget` on `target`.

    Args:
        model: the trained float Keras model (functional or Sequential), logits out.
        train_data, val_data: (x, y) arrays or .npz paths with 'x' and 'y'. Choices are made
            on `val_data`; keep a test split apart to report.
        budget: a `Budget` (or a dict of its fields).
        target: a `Target` or its name (`targets.get_target`): "host", "host:2",
            "reference", "micro", "ethos-u55-128", ..., "android[:SERIAL]" (with `binary`).
        max_accuracy_drop: points of int8 validation accuracy the result may lose against
            the unchanged int8 model.
        epochs, learning_rate: the fine-tune of each plan (Adam, batch 32, distilled).
        qat: fine-tune the stripped model with QAT before conversion.
        round_to: kept channel counts are multiples of this.
        settings: the sparsities each group is tried at (1.0 is added for removable blocks).
        max_rounds: plans fine-tuned at most.

    Returns:
        A `Result`; `out_dir` holds model.keras, model.tflite, plan.json, report.json,
        report.md, accuracy_vs_latency.png / accuracy_vs_size.png and cache.jsonl.

    Raises:
        InputError: bad data, budget or target (one line each).
        BudgetError: no plan met the budget; the message has the best reached.
    """
    start = time.perf_counter()
    model, _ = as_functional(model, "compress() model")
    budget = budget if isinstance(budget, Budget) else Budget(**dict(budget))
    train, val = check_data(model, train_data, "train_data"), check_data(model, val_data,
                                                                          "val_data")
    target = target if isinstance(target, Target) else get_target(target, binary=binary)
    if not 0 <= max_accuracy_drop <= 100:
        raise InputError(f"max_accuracy_drop is in points, 0 to 100. Received: "
                         f"max_accuracy_drop={max_accuracy_drop!r}")
    limits = budget.limits()
    unmeasured = [m for m in limits if m != "macs" and m not in target.metrics]
    if unmeasured:
        raise InputError(f"Target {target.name} does not measure {', '.join(unmeasured)}; "
                         f"it measures {', '.join(target.metrics)}")
    ensure_writable_dir(out_dir)
    cache = Cache(os.path.join(out_dir, "cache.jsonl"))
    base, candidates = search.measure_candidates(model, train, val, target, cache,
                                                 settings=settings, layers=layers,
                                                 round_to=round_to, log=log)
    base_accuracy = variants.accuracy(base.tflite, *val)
    if log:
        log(f"base: int8 accuracy {base_accuracy:.4f}, " + ", ".join(
            f"{k} {v:,.1f}" for k, v in base.cost.items() if isinstance(v, (int, float))))
    tried, margin = [], dict(limits)
    result = None
    for round_index in range(max_rounds):
        plan = search.solve(base, candidates, margin)
        if plan is None:
            break
        if any(plan.key == t["plan"] for t in tried):
            # the prediction said it fits but it did not: ask for more than the step missed
            margin = {m: v * 0.9 for m, v in margin.items()}
            continue
        if log:
            log(f"round {round_index + 1}: plan {plan.key}; predicted "
                + ", ".join(f"{k} {v:,.1f}" for k, v in plan.predicted_cost.items())
                + f", one-shot loss {plan.predicted_drop * 100:.2f} point")
        small, fb, measured, acc = _build(model, plan, train, val, target, out_dir, base,
                                          epochs=epochs, learning_rate=learning_rate, qat=qat,
                                          round_to=round_to, layers=layers, log=log)
        misses = budget.misses(measured)
        drop = (base_accuracy - acc) * 100
        tried.append({"plan": plan.key, "group_sparsity": plan.group_sparsity,
                      "predicted": plan.predicted_cost, "measured": measured,
                      "accuracy": acc, "drop_points": drop, "misses": misses})
        if log:
            log("  measured: " + ", ".join(f"{k} {v:,.1f}" for k, v in measured.items()
                                            if isinstance(v, (int, float)))
                + f"; int8 accuracy {acc:.4f} ({'lost' if drop >= 0 else 'gained'} "
                  f"{abs(drop):.2f} point)"
                + (f"; misses {'; '.join(misses)}" if misses else "; fits"))
        if not misses and drop <= max_accuracy_drop:
            result = (plan, small, fb, measured, acc)
            break
        if drop > max_accuracy_drop and not misses:
            break  # a tighter budget would only lose more
        for m in limits:  # ask the prediction for less by the factor it missed by
            if m in measured and measured[m] > limits[m]:
                margin[m] *= plan.predicted_cost[m] / measured[m]
    report = _report(model, budget, target, base, base_accuracy, candidates, tried,
                     time.perf_counter() - start)
    _write_outputs(out_dir, report, base, base_accuracy, candidates, tried)
    if result is None:
        raise BudgetError(_miss_message(budget, base, candidates, tried, max_accuracy_drop,
                                        out_dir))
    plan, small, fb, measured, acc = result
    plan_json = {"prune": {"sparsity": search.partial_top(plan.choice),
                           "group_sparsity": plan.group_sparsity, "round_to": round_to,
                           "layers": None if layers is None else repr(layers)},
                 "fine_tune": {"epochs": epochs, "learning_rate": learning_rate,
                               "distilled": True, "qat": qat},
                 "target": target.name, "budget": budget.limits()}
    small.save(os.path.join(out_dir, "model.keras"))
    atomic_write(os.path.join(out_dir, "model.tflite"), fb)
    atomic_write(os.path.join(out_dir, "plan.json"), json.dumps(plan_json, indent=2).encode())
    return Result(small, fb, plan_json, measured, acc, base_accuracy, report)


def _build(model, plan, train, val, target, out_dir, base, *, epochs, learning_rate, qat,
           round_to, layers, log):
    """Fine-tunes (or reloads from out_dir/runs/) one plan; converts; measures on target."""
    runs = os.path.join(out_dir, "runs")
    os.makedirs(runs, exist_ok=True)
    name = fingerprint((plan.key + f"|{epochs}|{learning_rate}|{qat}|{round_to}").encode())
    path = os.path.join(runs, f"{name}.keras")
    if os.path.exists(path):
        small = keras.saving.load_model(path)
    else:
        small = _fine_tune(model, plan, train, epochs=epochs, learning_rate=learning_rate,
                           round_to=round_to, layers=layers, log=log)
        if qat:
            small = _quantization_aware(small, model, train, max(2, epochs // 3), log)
        small.save(path + ".part.keras")
        os.replace(path + ".part.keras", path)
    from tflite_ext import convert

    fb = convert.to_tflite(small, None if qat else train[0][:300]).flatbuffer
    measured = dict(measure_beside(target, fb, base), macs=pruning.count_macs(small))
    return small, fb, measured, variants.accuracy(fb, *val)


def measure_beside(target, flatbuffer, base):
    """`flatbuffer`'s cost on `target`, its latency timed beside the base model's and scaled to
    the base's first measurement: host load changes between measurements, the ratio holds."""
    both = target.measure({"final": flatbuffer, "base": base.tflite})
    cost = dict(both["final"])
    if "latency_us" in cost and both["base"].get("latency_us"):
        cost["latency_us"] *= base.cost["latency_us"] / both["base"]["latency_us"]
    return cost


def _miss_message(budget, base, candidates, tried, max_drop, out_dir):
    plot = os.path.join(out_dir, "accuracy_vs_latency.png")
    if tried:
        best = min(tried, key=lambda t: (len(t["misses"]), t["drop_points"]))
        reached = ", ".join(f"{k} {v:,.1f}" for k, v in best["measured"].items()
                            if k in budget.limits())
        return (f"No plan met {budget} within {max_drop} point: the closest reached {reached} "
                f"losing {best['drop_points']:.2f} point (plan {best['plan']}); every measured "
                f"candidate is plotted in {plot}")
    _, cost = search.best_reachable(base, candidates, list(budget.limits()))
    reached = ", ".join(f"{k} {v:,.1f}" for k, v in cost.items())
    return (f"No plan is predicted to meet {budget}: pruning every group as far as measured "
            f"reaches about {reached}; every measured candidate is plotted in {plot}")


def _report(model, budget, target, base, base_accuracy, candidates, tried, seconds):

    return {"model": model.name, "target": target.name, "budget": budget.limits(),
            "base": {"int8_accuracy": base_accuracy, "one_shot_accuracy": base.accuracy,
                     "cost": base.cost},
            "candidates": [{"name": c.name, "pattern": c.pattern, "sparsity": c.sparsity,
                            "one_shot_accuracy": c.accuracy, "cost": c.cost}
                           for c in candidates],
            "rounds": tried, "seconds": seconds, "environment": variants.environment()}


def _write_outputs(out_dir, report, base, base_accuracy, candidates, tried):
    from tflite_ext.bench import report as report_lib

    rows = [{"round": i + 1, "plan": t["plan"], "accuracy": t["accuracy"],
             "drop (points)": t["drop_points"], **{k: v for k, v in t["measured"].items()
                                                   if isinstance(v, (int, float))},
             "misses": "; ".join(t["misses"]) or "fits"} for i, t in enumerate(tried)]
    columns = [(k, k) for k in dict.fromkeys(k for r in rows for k in r)] or [("round", "round")]
    md = (f"# compress: {report['model']} on {report['target']}\n\nBudget: "
          f"{report['budget']}; base int8 accuracy {base_accuracy:.4f}; "
          f"{len(candidates)} one-change candidates measured; {report['seconds']:.0f} s.\n\n"
          + report_lib.markdown_table(rows, columns))
    report_lib.write_report(out_dir, "report", report, md)
    points = [{"name": "base", "accuracy": base.accuracy,
               "size_bytes": base.cost.get("flash_bytes", 0) or 1,
               "latency_us": base.cost.get("latency_us")}]
    points += [{"name": c.name, "accuracy": c.accuracy,
                "size_bytes": c.cost.get("flash_bytes", 0) or 1,
                "latency_us": c.cost.get("latency_us")} for c in candidates]
    points += [{"name": f"round {i + 1}", "accuracy": t["accuracy"],
                "size_bytes": t["measured"].get("flash_bytes", 0) or 1,
                "latency_us": t["measured"].get("latency_us")} for i, t in enumerate(tried)]
    report_lib.plot_variants(points, out_dir)
