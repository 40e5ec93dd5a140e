"""Pruning benchmarks: graph build time, pruning-epoch overhead, end-to-end results.

Prints:
  (a) time to build the dependency graph of keras.applications.MobileNetV2(weights=None)
      (target <= 2 s);
  (b) a pruning epoch vs a plain epoch on the digits CNN (target <= 1.3x);
  (c) ResNet-8 on tasks.digits(32, 3): train, prune to a MAC target, fine-tune, strip; MACs,
      params, int8 bytes, LiteRT latency and accuracy before/after;
  (d) digits CNN: float vs structured prune + strip + int8 (bytes, accuracy), the peer target
      (int8 <= 27,797 bytes = 1/10 of tfmot's 277,968, accuracy >= float - 0.5 point).

Usage:
    PYTHONPATH=. python tools/bench_pruning.py [--parts abcd] [--quick]
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Re-training ResNet-8 after a structured-pruning fit corrupts the heap with TF's oneDNN
# kernels on in this TF 2.21 build (see tools/compare.py); training numerics only.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import graph, models, pruning, tasks  # noqa: E402


def part_a():
    model = keras.applications.MobileNetV2(weights=None)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        g = graph.DependencyGraph(model)
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
    from tflite_ext import convert

    return convert.to_tflite(model, rep).flatbuffer


def _int8_accuracy(flatbuffer, data):
    from tflite_ext.bench import host

    return host.evaluate(flatbuffer, data.x_test, data.y_test)["accuracy"]


def _fit(model, data, epochs, lr, callbacks=()):
    models.compile_classifier(model, lr)
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0,
              callbacks=list(callbacks))
    return model.evaluate(data.x_test, data.y_test, verbose=0)[1]


RESNET8_STAGES = ("stem_relu", "s1_out", "s2_out", "s3_out")  # cumulative-latency cut points


def _float_resnet8(data, seed, epochs, cache_dir):
    """Trained float ResNet-8 for `seed` (Adam 1e-3, batch 32), optionally cached on disk."""
    name = f"resnet8_seed{seed}_e{epochs}_n{len(data.x_train)}.keras"
    path = cache_dir and os.path.join(cache_dir, name)
    if path and os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(seed)
    model = models.resnet8(data.input_shape, data.num_classes)
    _fit(model, data, epochs, 1e-3)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        model.save(path)
    return model


def _prune_finetune(float_model, data, args, seed, sparsity):
    """prune (logits excluded) -> fine-tune with PruningCallback (optionally distilled) -> strip
    -> BatchNormalization recalibrated on the training images."""
    from tflite_ext import distillation

    keras.utils.set_random_seed(seed)
    steps = -(-len(data.x_train) // 32)
    end_step = args.end_step or steps * max(args.ft_epochs // 2, 1)
    schedule = pruning.PolynomialDecay(0.0, sparsity, 0, end_step, frequency=args.frequency)
    student = pruning.prune(float_model, schedule, layers=lambda layer: layer.name != "logits",
                            importance=args.importance, scope=args.scope,
                            round_to=args.round_to, group_sparsity=args.group_sparsity)
    lr = args.ft_lr
    if args.cosine:
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=args.ft_epochs * steps,
                                                    alpha=0.05)
    callbacks = [pruning.PruningCallback(data=(data.x_train[:256], data.y_train[:256]))]
    if args.distill:
        trainer = distillation.distill(float_model, student, temperature=args.temperature,
                                       alpha=args.alpha, optimizer=keras.optimizers.Adam(lr))
    else:
        trainer = models.compile_classifier(student, lr)
    trainer.fit(data.x_train, data.y_train, epochs=args.ft_epochs, batch_size=32, verbose=0,
                callbacks=callbacks)
    small = pruning.strip(student)
    pruning.recalibrate_batch_norm(small, data.x_train)  # BN statistics after pruning
    return small


def _group_sparsity(text):
    """'s3.*=0.5,s2a_.*=0.75' -> {"s3.*": 0.5, "s2a_.*": 0.75} (order kept: first match wins)."""
    out = {}
    for item in filter(None, text.split(",")):
        pattern, _, value = item.rpartition("=")
        if not pattern:
            raise argparse.ArgumentTypeError(f"expected regex=sparsity, got {item!r}")
        out[pattern] = float(value)
    return out


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
    from tflite_ext.bench import host

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


def _resnet8_seed(args, seed):
    """One seed of part (c); returns the row of figures and prints it."""
    from tflite_ext.bench import host

    data = tasks.validation_split(tasks.digits(32, 3), args.val_fraction, seed)
    epochs = 3 if args.quick else args.float_epochs
    float_model = _float_resnet8(data, seed, epochs, args.float_cache)
    acc = float_model.evaluate(data.x_test, data.y_test, verbose=0)[1]
    sparsity, predicted = args.sparsity, None
    if sparsity is None:
        sparsity, predicted = pruning.sparsity_for_mac_ratio(
            float_model, args.mac_ratio, round_to=args.round_to, scope=args.scope,
            layers=lambda layer: layer.name != "logits")
    if args.quick:
        args.ft_epochs = 2
    small = _prune_finetune(float_model, data, args, seed, sparsity)
    small_acc = models.compile_classifier(small).evaluate(data.x_test, data.y_test, verbose=0)[1]
    rep = data.x_train[:200]
    fb_full, fb_small = _int8(float_model, rep), _int8(small, rep)
    lat = host.time_interleaved({"full": fb_full, "small": fb_small}, x=data.x_test[:50],
                                runs=args.timing_runs)
    macs_full, macs_small = pruning.count_macs(float_model), pruning.count_macs(small)
    int8_full, int8_small = _int8_accuracy(fb_full, data), _int8_accuracy(fb_small, data)
    row = dict(seed=seed, sparsity=sparsity, mac_x=macs_full / macs_small,
               lat_full=lat["full"], lat_small=lat["small"], lat_x=lat["full"] / lat["small"],
               acc_full=int8_full, acc_small=int8_small)
    split = f"validation ({args.val_fraction:.0%} of train)" if args.val_fraction else "test"
    print(f"(c) ResNet-8 on digits 32x32x3, seed {seed}, sparsity {sparsity} ({args.scope}, "
          f"{args.importance}, round_to={args.round_to}"
          + (f", groups {_format_groups(args.group_sparsity)}" if args.group_sparsity else "")
          + (f", predicted MAC ratio {predicted:.2f}x" if predicted else "") + f"), "
          f"{args.ft_epochs} fine-tune epochs at {args.ft_lr}"
          + (" cosine" if args.cosine else "")
          + (f", distilled T={args.temperature} alpha={args.alpha}" if args.distill else "")
          + f"; accuracy on {split}:")
    print("    widths  " + " ".join(f"{k.replace('_conv', '')}={v}"
                                    for k, v in _widths(small).items()))
    print(f"    MACs    {macs_full:>10,} -> {macs_small:>10,}  ({row['mac_x']:.2f}x)")
    print(f"    params  {float_model.count_params():>10,} -> {small.count_params():>10,}")
    print(f"    int8    {len(fb_full):>10,} -> {len(fb_small):>10,} bytes")
    print(f"    LiteRT  {lat['full']:>10.1f} -> {lat['small']:>10.1f} us median, 1 thread, "
          f"interleaved ({row['lat_x']:.2f}x)")
    print(f"    float accuracy {acc:.4f} -> {small_acc:.4f}; int8 {int8_full:.4f} -> "
          f"{int8_small:.4f} ({(int8_small - int8_full) * 100:+.2f} pt)")
    checks = [("MACs >= 3x fewer", row["mac_x"] >= 3.0),
              ("latency >= 2x lower", row["lat_x"] >= 2.0),
              ("int8 accuracy >= unpruned int8 - 1 pt", int8_small >= int8_full - 0.01)]
    print("    targets: " + "; ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks))
    if args.profile:
        _stage_profile(float_model, small, rep, args.timing_runs)
    row["passed"] = all(ok for _, ok in checks)
    return row


def part_c(args):
    rows = [_resnet8_seed(args, seed) for seed in args.seeds]
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
          f"acc {_int8_accuracy(fb_full, data):.4f}; peer target <= 27,797 bytes, "
          f">= {acc - 0.005:.4f}")
    for s in sparsities:
        keras.utils.set_random_seed(0)
        schedule = pruning.PolynomialDecay(0.0, s, 0, 400, frequency=50)
        pruned = pruning.prune(float_model, schedule, round_to=8, importance=importance,
                               scope=scope)
        p_acc = _fit(pruned, data, 2 if quick else ft_epochs, 5e-4, [pruning.PruningCallback()])
        small = pruning.strip(pruned)
        fb = _int8(small, rep)
        print(f"    sparsity {s} ({importance}, {scope}, round_to=8, {ft_epochs} epochs at 5e-4): params {small.count_params():,}, MACs "
              f"{pruning.count_macs(small):,}, int8 {len(fb):,} bytes "
              f"({len(fb_full) / len(fb):.1f}x smaller), float acc {p_acc:.4f}, int8 acc "
              f"{_int8_accuracy(fb, data):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--quick", action="store_true", help="few epochs (smoke run)")
    parser.add_argument("--digits-sparsity", type=float, nargs="+", default=[0.75, 0.8])
    parser.add_argument("--ft-epochs", type=int, default=15)
    parser.add_argument("--importance", default="l2")
    parser.add_argument("--mac-ratio", type=float, default=3.2,
                        help="ResNet-8 MAC target (used when --sparsity is not given)")
    parser.add_argument("--round-to", type=int, default=4, help="ResNet-8 channel multiple")
    c = parser.add_argument_group("part (c) ResNet-8 recipe")
    c.add_argument("--sparsity", type=float, default=None,
                   help="ResNet-8 sparsity (overrides --mac-ratio)")
    c.add_argument("--scope", default="local", help="local or global channel ranking")
    c.add_argument("--group-sparsity", type=_group_sparsity, default=None,
                   help="per-group final sparsity, e.g. 's3.*=0.5,s2a_.*=0.75' (prune's "
                        "group_sparsity: first regex matching a group's layers wins; the "
                        "schedule ramps each group in proportion; no commas inside regexes)")
    c.add_argument("--float-epochs", type=int, default=30, help="float training (Adam 1e-3)")
    c.add_argument("--ft-lr", type=float, default=5e-4, help="pruning fine-tune Adam rate")
    c.add_argument("--cosine", action="store_true", help="cosine-decay the fine-tune rate")
    c.add_argument("--end-step", type=int, default=None,
                   help="sparsity ramp end step (default: half the fine-tune steps)")
    c.add_argument("--frequency", type=int, default=20, help="mask update every N steps")
    c.add_argument("--distill", action="store_true", help="the float model teaches the student")
    c.add_argument("--temperature", type=float, default=4.0)
    c.add_argument("--alpha", type=float, default=0.5, help="ground-truth loss weight")
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    c.add_argument("--val-fraction", type=float, default=0.0,
                   help="tune on a stratified split of the training data (0: report test)")
    c.add_argument("--float-cache", default=None, help="directory caching float models")
    c.add_argument("--timing-runs", type=int, default=1000)
    c.add_argument("--profile", action="store_true",
                   help="cumulative per-stage LiteRT latency of both int8 models")
    args = parser.parse_args()
    if "a" in args.parts:
        part_a()
    if "b" in args.parts:
        part_b()
    if "c" in args.parts:
        part_c(args)
    if "d" in args.parts:
        part_d(args.quick, args.digits_sparsity, args.ft_epochs, args.importance, args.scope)


if __name__ == "__main__":
    main()
