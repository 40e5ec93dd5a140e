"""Pruning benchmarks: graph build time, pruning-epoch overhead, end-to-end results.

Prints:
  (a) time to build the dependency graph of keras.applications.MobileNetV2(weights=None)
      (target <= 2 s);
  (b) a pruning epoch vs a plain epoch on the digits CNN (target <= 1.3x);
  (c) ResNet-8 on tasks.digits(32, 3): train, prune to a MAC target, fine-tune, strip; MACs,
      params, int8 bytes, LiteRT latency and accuracy before/after;
  (d) digits CNN: float vs structured prune + strip + int8 (bytes, accuracy), the peer target
      (int8 <= 27,797 bytes = 1/10 of tfmot's 277,968, accuracy >= float - 0.5 point).

Training and measuring go through tflite_ext.bench.variants, as in tools/compare.py.

Usage:
    python tools/bench_pruning.py [--parts abcd] [--quick]
    python tools/bench_pruning.py --parts c --distill --sparsity 0.5 --round_to 16 \
        --group_sparsity "s1a_.*=1.0,stem_.*=0.0,s2.*=0.5,s3.*=0.25" --seeds 0 --seeds 1
    python tools/bench_pruning.py --help
"""
import os
import statistics
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Re-training ResNet-8 after a structured-pruning fit corrupts the heap with TF's oneDNN
# kernels on in this TF 2.21 build (see tools/compare.py); training numerics only.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402

from tflite_ext import convert, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import host, variants  # noqa: E402


def _group_sparsity(items):
    """["s3.*=0.5", "s2a_.*=0.75"] -> {"s3.*": 0.5, "s2a_.*": 0.75} (order kept: first match
    wins); raises ValueError on an item that is not regex=sparsity."""
    out = {}
    for item in items:
        pattern, _, value = item.rpartition("=")
        if not pattern:
            raise ValueError(item)
        out[pattern] = float(value)
    return out


def _valid_groups(items):
    try:
        _group_sparsity(items or [])
    except ValueError:
        return False
    return True


flags.DEFINE_string("parts", "abcd", "Which parts to run (letters a-d, see above).")
flags.DEFINE_boolean("quick", False, "Few epochs (a smoke run).")
flags.DEFINE_multi_float("digits_sparsity", [0.75, 0.8], "Part (d) sparsities (repeat the "
                         "flag for more).")
flags.DEFINE_integer("ft_epochs", 15, "Pruning fine-tune epochs.", lower_bound=1)
flags.DEFINE_string("importance", "l2", "Channel ranking criterion (l1, l2, bn_scale, ...).")
flags.DEFINE_float("mac_ratio", 3.2, "ResNet-8 MAC target (used when --sparsity is not given).")
flags.DEFINE_integer("round_to", 4, "ResNet-8 channel multiple.", lower_bound=1)
# Part (c): the ResNet-8 recipe.
flags.DEFINE_float("sparsity", None, "ResNet-8 sparsity (overrides --mac_ratio).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("scope", "local", ["local", "global"], "Channel ranking scope.")
flags.DEFINE_list("group_sparsity", None, "Per-group final sparsity, e.g. "
                  "'s3.*=0.5,s2a_.*=0.75' (prune's group_sparsity: first regex matching a "
                  "group's layers wins; the schedule ramps each group in proportion; no commas "
                  "inside regexes).")
flags.register_validator("group_sparsity", _valid_groups,
                         "expected regex=sparsity items, comma separated")
flags.DEFINE_integer("float_epochs", 30, "Float training epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_float("ft_lr", 5e-4, "Pruning fine-tune Adam rate.")
flags.DEFINE_boolean("cosine", False, "Cosine-decay the fine-tune rate.")
flags.DEFINE_integer("end_step", None, "Sparsity ramp end step (default: half the fine-tune "
                     "steps).", lower_bound=1)
flags.DEFINE_integer("frequency", 20, "Mask update every N steps.", lower_bound=1)
flags.DEFINE_boolean("distill", False, "The float model teaches the student.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_float("alpha", 0.5, "Ground-truth loss weight when distilling.")
flags.DEFINE_multi_integer("seeds", [0], "Seeds of part (c), each its own float model (repeat "
                           "the flag for more).")
flags.DEFINE_float("val_fraction", 0.0, "Tune on a stratified split of the training data "
                   "(0: report test).", lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_string("float_cache", None, "Directory caching float models.")
flags.DEFINE_integer("timing_runs", 1000, "Interleaved LiteRT timing rounds.", lower_bound=1)
flags.DEFINE_boolean("profile", False, "Cumulative per-stage LiteRT latency of both int8 "
                     "models.")
FLAGS = flags.FLAGS


def part_a():
    model = keras.applications.MobileNetV2(weights=None)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        g = pruning.DependencyGraph(model)
        times.append(time.perf_counter() - start)
    print(f"(a) MobileNetV2 dependency graph: {len(g.nodes)} nodes, {len(g.groups)} groups, "
          f"median {statistics.median(times):.3f} s (target <= 2 s)")


def _epoch_seconds(model, data, callbacks, epochs):
    times = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: times.append(-time.perf_counter()),
        on_epoch_end=lambda e, logs: times.__setitem__(-1, times[-1] + time.perf_counter()))
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0,
              callbacks=list(callbacks) + [timer])
    return statistics.median(times[1:])  # the first epoch traces and compiles


def part_b(epochs=6):
    data = tasks.digits()
    t_plain = []
    for _ in range(2):  # plain runs before and after the pruned ones: machine noise shows
        keras.utils.set_random_seed(0)
        plain = models.compile_classifier(models.digits_cnn())
        t_plain.append(_epoch_seconds(plain, data, [], epochs))
    rows = []
    for freq in (50, 10):
        keras.utils.set_random_seed(0)
        schedule = pruning.PolynomialDecay(0.0, 0.75, 0, 40 * epochs, frequency=freq)
        pruned = models.compile_classifier(pruning.prune(models.digits_cnn(), schedule))
        t = _epoch_seconds(pruned, data, [pruning.PruningCallback()], epochs)
        rows.append((freq, t))
    keras.utils.set_random_seed(0)
    plain = models.compile_classifier(models.digits_cnn())
    t_plain.append(_epoch_seconds(plain, data, [], epochs))
    print("(b) digits CNN epoch (40 steps of 32): plain "
          + ", ".join(f"{t * 1e3:.0f}" for t in t_plain) + " ms (3 runs)")
    t_plain = statistics.median(t_plain)
    for freq, t in rows:
        print(f"    pruning epoch, masks updated every {freq} steps: {t * 1e3:.0f} ms = "
              f"{t / t_plain:.2f}x plain (target <= 1.3x)")


def _int8(model, rep):
    return convert.to_tflite(model, rep).flatbuffer


def _fit(model, data, epochs, lr, callbacks=()):
    """Trains (Adam `lr`, batch 32); returns the Keras test accuracy."""
    variants.fit(model, data, epochs=epochs, learning_rate=lr, callbacks=callbacks)
    return variants.accuracy(model, data.x_test, data.y_test)


RESNET8_STAGES = ("stem_relu", "s1_out", "s2_out", "s3_out")  # cumulative-latency cut points


def _float_resnet8(data, seed, epochs):
    """Trained float ResNet-8 for `seed` (Adam 1e-3, batch 32), cached in --float_cache."""
    name = f"resnet8_seed{seed}_e{epochs}_n{len(data.x_train)}.keras"
    return variants.train_or_load(FLAGS.float_cache and os.path.join(FLAGS.float_cache, name),
                                  lambda: models.resnet8(data.input_shape, data.num_classes),
                                  data, seed=seed, epochs=epochs, learning_rate=1e-3)


def _prune_finetune(float_model, data, seed, sparsity, ft_epochs):
    """prune (logits excluded) -> fine-tune with PruningCallback (optionally distilled) -> strip
    -> BatchNormalization recalibrated on the training images."""
    keras.utils.set_random_seed(seed)
    steps = -(-len(data.x_train) // 32)
    end_step = FLAGS.end_step or steps * max(ft_epochs // 2, 1)
    schedule = pruning.PolynomialDecay(0.0, sparsity, 0, end_step, frequency=FLAGS.frequency)
    student = pruning.prune(float_model, schedule, layers=lambda layer: layer.name != "logits",
                            importance=FLAGS.importance, scope=FLAGS.scope,
                            round_to=FLAGS.round_to, group_sparsity=_groups())
    lr = FLAGS.ft_lr
    if FLAGS.cosine:
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=ft_epochs * steps,
                                                    alpha=0.05)
    callbacks = [pruning.PruningCallback(data=(data.x_train[:256], data.y_train[:256]))]
    variants.fit(student, data, epochs=ft_epochs, learning_rate=lr,
                 teacher=float_model if FLAGS.distill else None,
                 temperature=FLAGS.temperature, alpha=FLAGS.alpha, callbacks=callbacks)
    small = pruning.strip(student)
    pruning.recalibrate_batch_norm(small, data.x_train)  # BN statistics after pruning
    return small


def _groups():
    return _group_sparsity(FLAGS.group_sparsity) if FLAGS.group_sparsity else None


def _format_groups(groups):
    return ",".join(f"{p}={v}" for p, v in groups.items())


def _widths(model):
    """Output channels of every Conv2D, in model order (e.g. stem 8, s1a 8, ...)."""
    return {layer.name: layer.filters for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)}


def _stage_profile(full, small, rep, runs):
    """Cumulative LiteRT latency up to each stage output: where the remaining time is spent.

    Each prefix model (input -> stage output, int8) is converted and all are timed interleaved.
    """
    fbs = {}
    for tag, model in (("full", full), ("small", small)):
        names = {layer.name for layer in model.layers}
        for cut in RESNET8_STAGES:
            if cut in names:
                prefix = keras.Model(model.inputs, model.get_layer(cut).output)
                fbs[f"{tag}:{cut}"] = _int8(prefix, rep)
        fbs[f"{tag}:logits"] = _int8(model, rep)
    lat = host.time_interleaved(fbs, x=rep[:50], runs=runs)
    for tag in ("full", "small"):
        prev, parts = 0.0, []
        for key in [k for k in fbs if k.startswith(tag + ":")]:
            parts.append(f"{key.split(':')[1]} +{lat[key] - prev:.1f}")
            prev = lat[key]
        print(f"    profile {tag:5s} (cumulative, us): " + ", ".join(parts)
              + f" = {prev:.1f}")


def _resnet8_seed(seed):
    """One seed of part (c); returns the row of figures and prints it."""
    data = tasks.validation_split(tasks.digits(32, 3), FLAGS.val_fraction, seed)
    float_model = _float_resnet8(data, seed, 3 if FLAGS.quick else FLAGS.float_epochs)
    acc = variants.accuracy(float_model, data.x_test, data.y_test)
    sparsity, predicted = FLAGS.sparsity, None
    if sparsity is None:
        sparsity, predicted = pruning.sparsity_for_mac_ratio(
            float_model, FLAGS.mac_ratio, round_to=FLAGS.round_to, scope=FLAGS.scope,
            layers=lambda layer: layer.name != "logits")
    ft_epochs = 2 if FLAGS.quick else FLAGS.ft_epochs
    small = _prune_finetune(float_model, data, seed, sparsity, ft_epochs)
    small_acc = variants.accuracy(small, data.x_test, data.y_test)
    rep = data.x_train[:200]
    int8 = variants.measure({"full": _int8(float_model, rep), "small": _int8(small, rep)},
                            data.x_test, data.y_test, runs=FLAGS.timing_runs,
                            timing_x=data.x_test[:50])
    full, pruned = int8["full"], int8["small"]
    macs_full, macs_small = pruning.count_macs(float_model), pruning.count_macs(small)
    row = dict(seed=seed, sparsity=sparsity, mac_x=macs_full / macs_small,
               lat_full=full["median_us"], lat_small=pruned["median_us"],
               lat_x=full["median_us"] / pruned["median_us"],
               acc_full=full["tflite_accuracy"], acc_small=pruned["tflite_accuracy"])
    split = f"validation ({FLAGS.val_fraction:.0%} of train)" if FLAGS.val_fraction else "test"
    groups = _groups()
    print(f"(c) ResNet-8 on digits 32x32x3, seed {seed}, sparsity {sparsity} ({FLAGS.scope}, "
          f"{FLAGS.importance}, round_to={FLAGS.round_to}"
          + (f", groups {_format_groups(groups)}" if groups else "")
          + (f", predicted MAC ratio {predicted:.2f}x" if predicted else "") + f"), "
          f"{ft_epochs} fine-tune epochs at {FLAGS.ft_lr}"
          + (" cosine" if FLAGS.cosine else "")
          + (f", distilled T={FLAGS.temperature} alpha={FLAGS.alpha}" if FLAGS.distill else "")
          + f"; accuracy on {split}:")
    print("    widths  " + " ".join(f"{k.replace('_conv', '')}={v}"
                                    for k, v in _widths(small).items()))
    print(f"    MACs    {macs_full:>10,} -> {macs_small:>10,}  ({row['mac_x']:.2f}x)")
    print(f"    params  {float_model.count_params():>10,} -> {small.count_params():>10,}")
    print(f"    int8    {full['bytes']:>10,} -> {pruned['bytes']:>10,} bytes")
    print(f"    LiteRT  {row['lat_full']:>10.1f} -> {row['lat_small']:>10.1f} us median, "
          f"1 thread, interleaved ({row['lat_x']:.2f}x)")
    print(f"    float accuracy {acc:.4f} -> {small_acc:.4f}; int8 {row['acc_full']:.4f} -> "
          f"{row['acc_small']:.4f} ({(row['acc_small'] - row['acc_full']) * 100:+.2f} pt)")
    checks = [("MACs >= 3x fewer", row["mac_x"] >= 3.0),
              ("latency >= 2x lower", row["lat_x"] >= 2.0),
              ("int8 accuracy >= unpruned int8 - 1 pt",
               row["acc_small"] >= row["acc_full"] - 0.01)]
    print("    targets: " + "; ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks))
    if FLAGS.profile:
        _stage_profile(float_model, small, rep, FLAGS.timing_runs)
    row["passed"] = all(ok for _, ok in checks)
    return row


def part_c():
    rows = [_resnet8_seed(seed) for seed in FLAGS.seeds]
    if len(rows) > 1:
        print("    seeds summary: " + " | ".join(
            f"seed {r['seed']}: MACs {r['mac_x']:.2f}x, latency {r['lat_x']:.2f}x "
            f"({r['lat_full']:.1f} -> {r['lat_small']:.1f} us), int8 acc "
            f"{r['acc_full']:.4f} -> {r['acc_small']:.4f}, {'PASS' if r['passed'] else 'FAIL'}"
            for r in rows))


def part_d(quick=False, sparsities=(0.75, 0.8), ft_epochs=15, importance="l2", scope="local"):
    data = tasks.digits()
    keras.utils.set_random_seed(0)
    float_model = models.digits_cnn()
    acc = _fit(float_model, data, 3 if quick else 30, 1e-3)
    rep = data.x_train[:200]
    fb_full = _int8(float_model, rep)
    print(f"(d) digits CNN: float acc {acc:.4f}; PTQ int8 {len(fb_full):,} bytes, "
          f"acc {variants.accuracy(fb_full, data.x_test, data.y_test):.4f}; peer target <= "
          f"27,797 bytes, >= {acc - 0.005:.4f}")
    for s in sparsities:
        keras.utils.set_random_seed(0)
        schedule = pruning.PolynomialDecay(0.0, s, 0, 400, frequency=50)
        pruned = pruning.prune(float_model, schedule, round_to=8, importance=importance,
                               scope=scope)
        p_acc = _fit(pruned, data, 2 if quick else ft_epochs, 5e-4, [pruning.PruningCallback()])
        small = pruning.strip(pruned)
        fb = _int8(small, rep)
        print(f"    sparsity {s} ({importance}, {scope}, round_to=8, {ft_epochs} epochs at "
              f"5e-4): params {small.count_params():,}, MACs {pruning.count_macs(small):,}, "
              f"int8 {len(fb):,} bytes ({len(fb_full) / len(fb):.1f}x smaller), float acc "
              f"{p_acc:.4f}, int8 acc {variants.accuracy(fb, data.x_test, data.y_test):.4f}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    if "a" in FLAGS.parts:
        part_a()
    if "b" in FLAGS.parts:
        part_b()
    if "c" in FLAGS.parts:
        part_c()
    if "d" in FLAGS.parts:
        part_d(FLAGS.quick, FLAGS.digits_sparsity, FLAGS.ft_epochs, FLAGS.importance,
               FLAGS.scope)


if __name__ == "__main__":
    app.run(main)
