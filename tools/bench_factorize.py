r"""Low-rank factorization on the digits: the figures of issue 13, side by side.

(a) The dense-heavy model (`models.dense_digits`: Flatten, Dense 512, Dense 512, Dense 10;
    301,066 parameters), per seed: float (Adam 1e-3, --float_epochs); `factorize` to
    --param_fraction of its parameters (greedy budget, ranks multiples of --round_to), before
    and after a --ft_epochs fine-tune at --ft_lr; DeepTwist at the same budget and epochs
    (`DeepTwist(param_budget=...)` every --every steps, then `factorize(rank=twist.ranks)`,
    no further training). All four converted to int8 (PTQ, 300 training images) and timed
    interleaved by LiteRT. Targets: parameters <= 40% and a fine-tune cost <= 0.5 point
    (mean over the seeds).

(b) ResNet-8 at 32x32x3, per seed: float (--resnet_epochs), the hand pruning recipe of
    tools/compare.py (--group_sparsity at --sparsity, --prune_epochs, distilled, strip, BN
    recalibrated), then spatial SVD of the pruned model to 1/--mac_ratio of the float MACs
    (`factorize(mac_budget=...)`), fine-tuned --svd_epochs taught by the float model, BN
    recalibrated. Int8 PTQ of float, pruned and pruned + SVD, latency interleaved with
    XNNPACK (wall clock) and with LiteRT's reference kernels (the thread's CPU time: immune to
    other processes' load); the int8 files are kept in build/bench_factorize/. Targets: >= 4x
    fewer MACs than the float (unpruned) model, int8 accuracy >= unpruned int8 - 1 point.

Usage:
    python tools/bench_factorize.py                       # (a) and (b), seeds 0-2
    python tools/bench_factorize.py --parts a --seeds 0 --quick
    python tools/bench_factorize.py --parts b --float_cache build/float_cache
"""
import os
import re
import statistics
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN aborts on ResNet-8's 1x1 stride 2

import keras  # noqa: E402

from tflite_ext import convert, factorization, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import host, variants  # noqa: E402

flags.DEFINE_string("parts", "ab", "Which parts to run (a: dense model, b: ResNet-8).")
flags.DEFINE_multi_integer("seeds", [0, 1, 2], "Seeds, each its own float model (repeat).")
flags.DEFINE_boolean("quick", False, "Few epochs (a smoke run, figures meaningless).")
flags.DEFINE_string("float_cache", None, "Directory caching float models.")
flags.DEFINE_integer("timing_runs", 500, "Interleaved LiteRT rounds.", lower_bound=1)
# (a)
flags.DEFINE_integer("float_epochs", 30, "(a) float epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_float("param_fraction", 0.4, "(a) parameters kept, a fraction of the float's.")
flags.DEFINE_integer("round_to", 8, "Ranks are multiples of this.", lower_bound=1)
flags.DEFINE_integer("ft_epochs", 5, "(a) fine-tune epochs after factorizing (and DeepTwist's).",
                     lower_bound=1)
flags.DEFINE_float("ft_lr", 3e-4, "(a) fine-tune Adam rate.")
flags.DEFINE_integer("every", 10, "(a) DeepTwist: steps between twists.", lower_bound=1)
# (b)
flags.DEFINE_integer("resnet_epochs", 30, "(b) float epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_float("sparsity", 0.5, "(b) pruning sparsity of groups --group_sparsity misses.")
flags.DEFINE_string("group_sparsity", "s1a_.*=1.0,stem_.*=0.0,s2.*=0.5,s3.*=0.25",
                    "(b) per-group sparsity (tools/compare.py's ResNet-8 recipe).")
flags.DEFINE_integer("prune_epochs", 15, "(b) pruning fine-tune epochs (Adam 5e-4).",
                     lower_bound=1)
flags.DEFINE_float("mac_ratio", 4.2, "(b) factorize to float MACs / this.")
flags.DEFINE_integer("svd_epochs", 10, "(b) fine-tune epochs after factorizing.", lower_bound=1)
flags.DEFINE_float("svd_lr", 3e-4, "(b) fine-tune Adam rate after factorizing.")
FLAGS = flags.FLAGS

_START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def _epochs(n):
    return 1 if FLAGS.quick else n


def _float(build, data, seed, epochs, tag):
    name = FLAGS.float_cache and os.path.join(
        FLAGS.float_cache, f"{tag}_seed{seed}_e{epochs}_n{len(data.x_train)}.keras")
    return variants.train_or_load(name, build, data, seed=seed, epochs=epochs,
                                  learning_rate=1e-3, label=f"  float {tag} seed {seed}", log=log)


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _int8(model, data):
    return convert.to_tflite(model, data.x_train[:300]).flatbuffer


def _mean_spread(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.4f}"


def dense_seed(seed):
    data = tasks.digits()
    float_model = _float(models.dense_digits, data, seed, _epochs(FLAGS.float_epochs), "dense")
    budget = FLAGS.param_fraction
    plan = factorization.plan(float_model, param_budget=budget, round_to=FLAGS.round_to)
    log(f"seed {seed}: plan at {budget:.0%} of the parameters\n{plan}")
    svd = factorization.factorize(float_model, param_budget=budget, round_to=FLAGS.round_to,
                                  verbose=False)
    svd_acc = variants.accuracy(svd, data.x_test, data.y_test)
    tuned = factorization.factorize(float_model, param_budget=budget, round_to=FLAGS.round_to,
                                    verbose=False)
    keras.utils.set_random_seed(seed)
    variants.fit(tuned, data, epochs=_epochs(FLAGS.ft_epochs), learning_rate=FLAGS.ft_lr,
                 label=f"  svd fine-tune seed {seed}", log=log)
    twisted = _copy(float_model)
    twist = factorization.DeepTwist(param_budget=budget, round_to=FLAGS.round_to,
                                    every=FLAGS.every)
    keras.utils.set_random_seed(seed)
    variants.fit(twisted, data, epochs=_epochs(FLAGS.ft_epochs), learning_rate=FLAGS.ft_lr,
                 callbacks=[twist], label=f"  deeptwist seed {seed}", log=log)
    deeptwist = factorization.factorize(twisted, rank=twist.ranks, verbose=False)
    keras_models = {"float": float_model, "svd": svd, "svd+ft": tuned, "deeptwist": deeptwist}
    rows = variants.measure({k: _int8(m, data) for k, m in keras_models.items()},
                            data.x_test, data.y_test, keras_models=keras_models,
                            runs=FLAGS.timing_runs, timing_x=data.x_test[:50])
    for name, model in keras_models.items():
        rows[name].update(params=model.count_params(),
                          keras_accuracy=variants.accuracy(model, data.x_test, data.y_test))
    rows["svd"]["keras_accuracy"] = svd_acc
    rows["ranks"] = plan.ranks
    return rows


def part_a():
    per_seed = {seed: dense_seed(seed) for seed in FLAGS.seeds}
    names = ("float", "svd", "svd+ft", "deeptwist")
    print(f"\n(a) Dense 512-512 on the digits, {FLAGS.param_fraction:.0%} parameter budget, ranks "
          f"x{FLAGS.round_to}, {FLAGS.ft_epochs} fine-tune epochs at {FLAGS.ft_lr}; LiteRT "
          f"1 thread, XNNPACK, interleaved; {host.describe_cpu()}")
    print("| seed | variant | params | Keras acc | int8 acc | .tflite bytes | median µs |")
    print("|---|---|---|---|---|---|---|")
    for seed, rows in per_seed.items():
        for name in names:
            r = rows[name]
            print(f"| {seed} | {name} | {r['params']:,} | {r['keras_accuracy']:.4f} | "
                  f"{r['tflite_accuracy']:.4f} | {r['bytes']:,} | {r['median_us']:.1f} |")
        print(f"| {seed} | ranks | {rows['ranks']} | | | | |")
    print("\nmean ± spread over seeds " + ", ".join(map(str, per_seed)) + ":")
    for name in names:
        accs = [rows[name]["tflite_accuracy"] for rows in per_seed.values()]
        lat = [rows[name]["median_us"] for rows in per_seed.values()]
        print(f"  {name:10s} int8 acc {_mean_spread(accs)}, median {statistics.fmean(lat):.1f} µs, "
              f"{per_seed[FLAGS.seeds[0]][name]['bytes']:,} bytes")
    drop = statistics.fmean(r["float"]["tflite_accuracy"] - r["svd+ft"]["tflite_accuracy"]
                            for r in per_seed.values())
    kept = statistics.fmean(r["svd+ft"]["params"] / r["float"]["params"] for r in per_seed.values())
    print(f"  targets: parameters {kept:.1%} <= 40% {'PASS' if kept <= 0.4 else 'FAIL'}; "
          f"fine-tuned drop {drop * 100:.2f} point <= 0.5 {'PASS' if drop <= 0.005 else 'FAIL'}")


def _groups():
    pairs = (item.split("=") for item in FLAGS.group_sparsity.split(",") if item)
    return {pattern: float(value) for pattern, value in pairs}


def resnet_seed(seed):
    data = tasks.digits(32, 3)
    float_model = _float(lambda: models.resnet8(data.input_shape, data.num_classes), data, seed,
                         _epochs(FLAGS.resnet_epochs), "resnet8")
    keras.utils.set_random_seed(seed)
    schedule = pruning.PolynomialDecay(0.0, FLAGS.sparsity, 0, 20 if FLAGS.quick else 200,
                                       frequency=10 if FLAGS.quick else 100)
    student = pruning.prune(float_model, schedule, layers=lambda layer: layer.name != "logits",
                            round_to=16, group_sparsity=_groups())
    variants.fit(student, data, epochs=_epochs(FLAGS.prune_epochs), learning_rate=5e-4,
                 teacher=float_model, callbacks=[pruning.PruningCallback()],
                 label=f"  prune seed {seed}", log=log)
    pruned = pruning.strip(student)
    pruning.recalibrate_batch_norm(pruned, data.x_train)
    budget = int(pruning.count_macs(float_model) / FLAGS.mac_ratio)
    convs = lambda layer: isinstance(layer, keras.layers.Conv2D)  # noqa: E731
    log(f"seed {seed}: factorizing the pruned model to {budget:,} MACs\n"
        + str(factorization.plan(pruned, mac_budget=budget, layers=convs, round_to=4)))
    svd = factorization.factorize(pruned, mac_budget=budget, layers=convs, round_to=4,
                                  verbose=False)
    keras.utils.set_random_seed(seed)
    variants.fit(svd, data, epochs=_epochs(FLAGS.svd_epochs), learning_rate=FLAGS.svd_lr,
                 teacher=float_model, label=f"  svd fine-tune seed {seed}", log=log)
    pruning.recalibrate_batch_norm(svd, data.x_train)
    keras_models = {"unpruned": float_model, "pruned": pruned, "pruned+svd": svd}
    fbs = {k: _int8(m, data) for k, m in keras_models.items()}
    for name, fb in fbs.items():  # kept, so they can be timed again (tflite-ext bench)
        os.makedirs("build/bench_factorize", exist_ok=True)
        with open(f"build/bench_factorize/resnet8_seed{seed}_{name}.tflite", "wb") as f:
            f.write(fb)
    rows = variants.measure(fbs, data.x_test, data.y_test, keras_models=keras_models,
                            runs=FLAGS.timing_runs, timing_x=data.x_test[:50])
    # Reference kernels take milliseconds, and on a shared machine the scheduler takes slices
    # of them (wall-clock medians once gave 8x for a 3.57x MAC ratio while another job ran):
    # timed in the thread's CPU time.
    reference = host.time_interleaved(fbs, data.x_test[:50], runs=max(FLAGS.timing_runs // 5, 5),
                                      warmup=2, reference=True, cpu_time=True)
    for name in rows:
        rows[name]["reference_us"] = reference[name]
    rows["ranks"] = {k: v for k, v in factorization.plan(
        pruned, mac_budget=budget, layers=convs, round_to=4).ranks.items()}
    return rows


def part_b():
    per_seed = {seed: resnet_seed(seed) for seed in FLAGS.seeds}
    print(f"\n(b) ResNet-8 on the digits 32x32x3: prune ({FLAGS.group_sparsity}) then spatial SVD "
          f"to 1/{FLAGS.mac_ratio} of the float MACs, {FLAGS.svd_epochs} distilled epochs; int8 "
          f"PTQ; LiteRT 1 thread interleaved; {host.describe_cpu()}")
    print("| seed | variant | MACs | MAC ratio | int8 acc | .tflite bytes | XNNPACK µs | "
          "reference µs |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, rows in per_seed.items():
        full = rows["unpruned"]
        for name in ("unpruned", "pruned", "pruned+svd"):
            r = rows[name]
            print(f"| {seed} | {name} | {r['macs']:,} | {full['macs'] / r['macs']:.2f}x | "
                  f"{r['tflite_accuracy']:.4f} | {r['bytes']:,} | {r['median_us']:.1f} "
                  f"({full['median_us'] / r['median_us']:.2f}x) | {r['reference_us']:.1f} "
                  f"({full['reference_us'] / r['reference_us']:.2f}x) |")
        print(f"| {seed} | ranks | {rows['ranks']} | | | | | |")
    for seed, rows in per_seed.items():
        full, svd = rows["unpruned"], rows["pruned+svd"]
        ratio = full["macs"] / svd["macs"]
        drop = full["tflite_accuracy"] - svd["tflite_accuracy"]
        print(f"  seed {seed} targets: MACs {ratio:.2f}x >= 4x {'PASS' if ratio >= 4 else 'FAIL'}; "
              f"int8 accuracy lost {drop * 100:.2f} point <= 1 "
              f"{'PASS' if drop <= 0.01 + 1e-9 else 'FAIL'}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    if not re.fullmatch(r"[ab]+", FLAGS.parts):
        raise app.UsageError(f"--parts takes letters a and b. Received: {FLAGS.parts!r}")
    if "a" in FLAGS.parts:
        part_a()
    if "b" in FLAGS.parts:
        part_b()
    log("done")


if __name__ == "__main__":
    app.run(main)
