r"""`compress` against the hand recipe, on each target: issue 15's figures.

ResNet-8 on the digits at 32x32x3, per target (--targets): the unpruned int8 model is measured
there; the budget is latency <= --latency_fraction x that; `compress` searches on a
validation split of the training images (--val_fraction) with --epochs distilled fine-tune
epochs; the hand recipe of tools/compare.py (first block removed, stem kept, 16x16 stage at
half, 8x8 stage at 3/4; channel multiples of 16) gets the same fine-tune and is measured on the
same target. Accuracy is int8 on the test split. The search time is compared with one prune +
fine-tune run (the hand recipe's).

The digits CNN (--model digits_cnn): flash <= --flash bytes (default: 80x smaller than the
float model) on target `micro`, the search free to prune, factorize and cluster (LUT); test
accuracy against the float model's. `--spread_seeds 0,1,2` fine-tunes every plan the search
fine-tuned from seeds 1 and 2 too: how far the same plan's test accuracy spreads.

Usage:
    python tools/bench_compress.py        # targets host, reference, ethos-u55-128
    python tools/bench_compress.py --targets micro --latency_fraction 0.5
    python tools/bench_compress.py --model digits_cnn [--spread_seeds 0,1,2]
"""
import json
import os
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN aborts on ResNet-8's 1x1 stride 2

from tflite_ext import compress, models, tasks  # noqa: E402
from tflite_ext.bench import host, variants  # noqa: E402
from tflite_ext.compress import Budget, api, search  # noqa: E402
from tflite_ext.compress.cache import Cache  # noqa: E402

flags.DEFINE_enum("model", "resnet8", ["resnet8", "digits_cnn"], "The reference model.")
flags.DEFINE_integer("flash", None, "digits_cnn: the flash budget in bytes (default: the float "
                     "model's size / 80).")
flags.DEFINE_list("rank_fractions", None, "Factorization settings the search tries (default: "
                  "0.5,0.25 for digits_cnn, free to combine everything; none for resnet8, "
                  "compress's default).")
flags.DEFINE_list("targets", ["host", "reference", "ethos-u55-128"], "Targets to compress for.")
flags.DEFINE_float("latency_fraction", 0.4, "Budget: latency <= this x the unpruned int8 model.")
flags.DEFINE_float("max_drop", None, "Accuracy points the result may lose (default 1.0 for "
                   "resnet8, 0.5 for digits_cnn).")
flags.DEFINE_integer("epochs", 15, "Fine-tune epochs of every plan (and the hand recipe).",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", api.LEARNING_RATE, "Adam's rate in the fine-tune of "
                   "every plan and the hand recipe (compress's default).")
flags.DEFINE_integer("float_epochs", 30, "Float training epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_float("val_fraction", 0.2, "Validation split of the training images.")
flags.DEFINE_integer("seed", 0, "Seed of the float model and the split.")
flags.DEFINE_string("out_dir", "build/bench_compress", "Outputs and the shared cache.")
flags.DEFINE_list("spread_seeds", ["0"], "digits_cnn: fine-tune each plan the search "
                  "fine-tuned from these seeds too and print their test accuracies (the "
                  "search's own seed first): how far one plan's fine-tune spreads.")
FLAGS = flags.FLAGS

HAND = {"s1a_.*": 1.0, "stem_.*": 0.0, "s2.*": 0.5, "s3.*": 0.25}  # tools/compare.py


def pruning_plan(group_sparsity):
    """A search.Plan of prune changes only, from {pattern: sparsity}."""
    return search.Plan(tuple(search.Change("prune", p, s, p) for p, s in group_sparsity.items()
                             if s), 0.0, {})


def fine_tuned_on_test(model, target, out, base, train, val, test, seeds=(0,), **build_args):
    """[(plan, flash bytes, latency µs, validation accuracy, [test accuracy per seed])] of every
    plan the last search fine-tuned (report.json), rebuilt from out/runs/ (the search's own
    seed is not trained again): what a search that ended in a BudgetError came closest with,
    and, with more `seeds`, how far the same plan's fine-tune spreads from its batch order."""
    with open(os.path.join(out, "report.json")) as f:
        rounds = [r for r in json.load(f)["rounds"] if r["stage"] == "fine-tuned"]
    changes = {c.label: c for c in search.changes_of(model, target,
                                                     rank_fractions=search.RANK_FRACTIONS)}
    rows = []
    for r in rounds:
        plan = search.Plan(tuple(changes[label] for label in r["plan"].split(",")), 0.0, {})
        tests = []
        for seed in seeds:
            _, converted, _, measured, acc = api._build(model, plan, train, val, target, out,
                                                        base, log=None, seed=seed, **build_args)
            tests.append(variants.accuracy(converted.flatbuffer, *test))
            if seed == seeds[0]:
                row = (r["plan"], measured.get("flash_bytes"), measured.get("latency_us"), acc)
        rows.append((*row, tests))
    return rows


def rank_fractions(default):
    return default if FLAGS.rank_fractions is None else tuple(float(f) for f in
                                                             FLAGS.rank_fractions)


def log(message):
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    if FLAGS.model == "digits_cnn":
        return digits_flash()
    max_drop = 1.0 if FLAGS.max_drop is None else FLAGS.max_drop
    full = tasks.digits(32, 3)
    data = tasks.validation_split(full, FLAGS.val_fraction, FLAGS.seed)
    out = os.path.join(FLAGS.out_dir, f"resnet8_seed{FLAGS.seed}")
    model = variants.train_or_load(
        os.path.join(out, "float.keras"), lambda: models.resnet8(data.input_shape, 10), data,
        seed=FLAGS.seed, epochs=FLAGS.float_epochs, learning_rate=1e-3, label="  float", log=log)
    train, val, test = ((data.x_train, data.y_train), (data.x_test, data.y_test),
                        (full.x_test, full.y_test))
    base_fb = search.int8(model, data.x_train)
    base_test = variants.accuracy(base_fb, *test)
    rows = []
    for name in FLAGS.targets:
        target = compress.get_target(name)
        # The whole search is timed, its one-change candidates included: their accuracies
        # (no target in them) are measured for the first target and shared by the others
        # through the cache; each target measures their cost. The budget is relative: compress
        # makes it absolute from its own measurement of the unpruned model.
        began = time.perf_counter()
        try:
            result = compress(model, train, val,
                              Budget.parse(latency=f"{FLAGS.latency_fraction:g}x"),
                              target=target, max_accuracy_drop=max_drop, epochs=FLAGS.epochs,
                              learning_rate=FLAGS.learning_rate, out_dir=out, log=log,
                              rank_fractions=rank_fractions(()))
            auto = dict(latency_us=result.measured["latency_us"], macs=result.measured["macs"],
                        test=variants.accuracy(result.flatbuffer, *test),
                        plan=result.report["rounds"][-1]["plan"], met=True)
        except compress.BudgetError as e:
            log(f"{name}: {e}")
            auto = dict(latency_us=float("nan"), macs=0, test=float("nan"), plan=str(e),
                        met=False)
        searched = time.perf_counter() - began
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)  # written by a search that missed too
        base_cost, budget = report["base"]["cost"], Budget(**report["budget"])
        base, _ = search.measure_candidates(model, train, val, target,
                                            Cache(os.path.join(out, "cache.jsonl")), log=None)
        began = time.perf_counter()
        plan = pruning_plan(HAND)
        small, _, fb, measured, _ = api._build(model, plan, train, val, target, out, base,
                                               epochs=FLAGS.epochs,
                                               learning_rate=FLAGS.learning_rate, qat=False,
                                               round_to=16, layers=None, log=log,
                                               budget=budget)  # timed as compress's result
        one_run = time.perf_counter() - began  # ~0 when the hand model was built before
        hand = dict(latency_us=measured["latency_us"], macs=measured["macs"],
                    test=variants.accuracy(fb, *test))
        rows.append((name, base_cost, budget, auto, hand, searched, one_run))
    cache = Cache(os.path.join(out, "cache.jsonl"))
    print(f"\nResNet-8 on the digits 32x32x3, seed {FLAGS.seed}; {host.describe_cpu()}; "
          f"validation {FLAGS.val_fraction:.0%} of the training images, {FLAGS.epochs} "
          f"fine-tune epochs per plan; int8 accuracy on the test split (unpruned "
          f"{base_test:.4f}); {len(cache.values)} cached measurements")
    print("| target | unpruned µs | budget µs | compress µs | compress test acc | compress plan "
          "| hand µs | hand test acc | search s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, base_cost, budget, auto, hand, searched, _ in rows:
        print(f"| {name} | {base_cost['latency_us']:,.1f} | {budget.latency_us:,.1f} | "
              f"{auto['latency_us']:,.1f} ({base_cost['latency_us'] / auto['latency_us']:.2f}x) "
              f"| {auto['test']:.4f} | {auto['plan']} | {hand['latency_us']:,.1f} "
              f"({base_cost['latency_us'] / hand['latency_us']:.2f}x) | {hand['test']:.4f} | "
              f"{searched:.0f} |")
    one_run = max(r[6] for r in rows)
    print(f"  search: all of it, its one-change candidates included; {FLAGS.targets[0]}'s "
          f"measured their accuracies, which the other targets took from the cache")
    for name, _, budget, auto, hand, searched, _ in rows:
        ok_budget = auto["met"] and auto["latency_us"] <= budget.latency_us
        ok_acc = auto["met"] and auto["test"] >= base_test - max_drop / 100
        ok_hand = auto["met"] and (auto["latency_us"] <= hand["latency_us"]
                                   or auto["test"] > hand["test"])
        print(f"  {name}: budget {'PASS' if ok_budget else 'FAIL'}; test accuracy >= unpruned "
              f"- {max_drop} point {'PASS' if ok_acc else 'FAIL'}; at least as fast as "
              f"the hand recipe (or more accurate) {'PASS' if ok_hand else 'FAIL'}; search "
              f"{searched:.0f} s = {searched / max(one_run, 1):.1f}x one prune + fine-tune run "
              f"({one_run:.0f} s)")


def digits_flash():
    """The digits CNN to a flash budget on `micro`: pruning, factorization, clustering + LUT."""
    from tflite_ext import convert

    max_drop = 0.5 if FLAGS.max_drop is None else FLAGS.max_drop
    full = tasks.digits()
    data = tasks.validation_split(full, FLAGS.val_fraction, FLAGS.seed)
    out = os.path.join(FLAGS.out_dir, f"digits_cnn_seed{FLAGS.seed}")
    model = variants.train_or_load(
        os.path.join(out, "float.keras"), lambda: models.digits_cnn(data.input_shape, 10), data,
        seed=FLAGS.seed, epochs=FLAGS.float_epochs, learning_rate=1e-3, label="  float", log=log)
    train, val, test = ((data.x_train, data.y_train), (data.x_test, data.y_test),
                        (full.x_test, full.y_test))
    float_fb = convert.to_tflite(model, mode="float32").flatbuffer
    float_test = variants.accuracy(float_fb, *test)
    budget = Budget(flash_bytes=FLAGS.flash or len(float_fb) // 80)
    log(f"float: {len(float_fb):,} bytes, test {float_test:.4f}; budget {budget} on micro")
    began = time.perf_counter()
    try:
        result = compress(model, train, val, budget, target="micro", max_accuracy_drop=max_drop,
                          epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate, out_dir=out,
                          log=log, rank_fractions=rank_fractions(search.RANK_FRACTIONS))
    except compress.BudgetError as e:
        log(f"digits_cnn: {e}")
        result = None
    searched = time.perf_counter() - began
    # One prune + fine-tune run for scale: 75% of every group (tools/compare.py's recipe),
    # timed from the base measured (cached), as the search is
    hand = pruning_plan({p: 0.75 for _, p in search.prunable_groups(model)})
    target = compress.get_target("micro")
    base, _ = search.measure_candidates(model, train, val, target,
                                        Cache(os.path.join(out, "cache.jsonl")), settings=(),
                                        clusters=(), qat=True, log=None)
    began = time.perf_counter()
    api._build(model, hand, train, val, target, out, base, epochs=FLAGS.epochs,
               learning_rate=FLAGS.learning_rate, qat=False, round_to=8, layers=None, log=log)
    one_run = time.perf_counter() - began
    print(f"\ndigits CNN, seed {FLAGS.seed}; {host.describe_cpu()}; validation "
          f"{FLAGS.val_fraction:.0%} of the training images; test split accuracy (LiteRT int8; "
          f"the LUT copy proven identical in TFLM)")
    print("| model | flash bytes | vs float | test accuracy | plan |")
    print("|---|---|---|---|---|")
    print(f"| float | {len(float_fb):,} | 1.0x | {float_test:.4f} | |")
    cost = (f"search {searched:.0f} s = {searched / max(one_run, 1):.1f}x one prune + fine-tune "
            f"run ({one_run:.0f} s; 0 when the search had built it: rerun with a fresh "
            f"--out_dir for the cold cost)")
    if result is None:
        print("| compress | no plan met the budget | | | |")
    else:
        size = result.measured["flash_bytes"]
        acc = variants.accuracy(result.flatbuffer, *test)
        print(f"| compress | {size:,} | {len(float_fb) / size:.1f}x | {acc:.4f} | "
              f"{result.report['rounds'][-1]['plan']} |")
        print(f"  flash <= {budget.flash_bytes:,}: "
              f"{'PASS' if size <= budget.flash_bytes else 'FAIL'}; test accuracy >= float - "
              f"{max_drop} point: {'PASS' if acc >= float_test - max_drop / 100 else 'FAIL'} "
              f"({(acc - float_test) * 100:+.2f})")
    print(f"  {cost}")
    seeds = [int(s) for s in FLAGS.spread_seeds]
    if result is None or len(seeds) > 1:
        print(f"  the plans it fine-tuned (validation accuracy decided; the float model has "
              f"{variants.accuracy(model, *val):.4f} there), test accuracy from seed(s) "
              f"{', '.join(map(str, seeds))}:")
        for plan, size, _, acc, tests in fine_tuned_on_test(
                model, target, out, base, train, val, test, seeds=seeds, epochs=FLAGS.epochs,
                learning_rate=FLAGS.learning_rate, qat=True, round_to=8, layers=None):
            print(f"  | {plan} | {size:,.0f} bytes | validation {acc:.4f} | test " + ", ".join(
                f"{t:.4f} ({(t - float_test) * 100:+.2f})" for t in tests) + " |")
    return 1 if result is None else 0


START = time.perf_counter()

if __name__ == "__main__":
    app.run(main)
