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


def part_c(quick=False, mac_ratio=3.2, round_to=4):
    from tflite_ext.bench import host

    data = tasks.digits(32, 3)
    keras.utils.set_random_seed(0)
    float_model = models.resnet8()
    epochs, ft_epochs = (3, 2) if quick else (20, 15)
    acc = _fit(float_model, data, epochs, 1e-3)
    sparsity, ratio = pruning.sparsity_for_mac_ratio(float_model, mac_ratio, round_to=round_to)
    steps = len(data.x_train) // 32 + 1
    schedule = pruning.PolynomialDecay(0.0, sparsity, 0, steps * max(ft_epochs // 2, 1),
                                       frequency=steps // 2)
    pruned = pruning.prune(float_model, schedule, round_to=round_to)
    pruned_acc = _fit(pruned, data, ft_epochs, 5e-4, [pruning.PruningCallback()])
    small = pruning.strip(pruned)
    rep = data.x_train[:200]
    fb_full, fb_small = _int8(float_model, rep), _int8(small, rep)
    lat = host.time_interleaved({"full": fb_full, "small": fb_small}, x=data.x_test[:50],
                                runs=300)
    print(f"(c) ResNet-8 on digits 32x32x3, sparsity {sparsity}, round_to={round_to} (predicted MAC ratio "
          f"{ratio:.2f}x), {ft_epochs} fine-tune epochs:")
    print(f"    MACs    {pruning.count_macs(float_model):>10,} -> "
          f"{pruning.count_macs(small):>10,}  ({pruning.count_macs(float_model) / pruning.count_macs(small):.2f}x)")
    print(f"    params  {float_model.count_params():>10,} -> {small.count_params():>10,}")
    print(f"    int8    {len(fb_full):>10,} -> {len(fb_small):>10,} bytes")
    print(f"    LiteRT  {lat['full']:>10.1f} -> {lat['small']:>10.1f} us median, 1 thread "
          f"({lat['full'] / lat['small']:.2f}x)")
    print(f"    float accuracy {acc:.4f} -> {pruned_acc:.4f}; int8 "
          f"{_int8_accuracy(fb_full, data):.4f} -> {_int8_accuracy(fb_small, data):.4f}")


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
    parser.add_argument("--scope", default="local")
    parser.add_argument("--mac-ratio", type=float, default=3.2, help="ResNet-8 MAC target")
    parser.add_argument("--round-to", type=int, default=4, help="ResNet-8 channel multiple")
    args = parser.parse_args()
    if "a" in args.parts:
        part_a()
    if "b" in args.parts:
        part_b()
    if "c" in args.parts:
        part_c(args.quick, args.mac_ratio, args.round_to)
    if "d" in args.parts:
        part_d(args.quick, args.digits_sparsity, args.ft_epochs, args.importance, args.scope)


if __name__ == "__main__":
    main()
