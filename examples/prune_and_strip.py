"""Structured pruning in model.fit, then strip: a .tflite that is really smaller and faster.

    python examples/prune_and_strip.py [--quick] [--out build/examples]

Trains ResNet-8 (MLPerf Tiny) on the digits upsampled to 32x32x3, removes whole filters with a
polynomial schedule (residual branches lose the same channels), strips them physically and
converts both models to full int8 so sizes, MACs and latency can be compared side by side.
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tflite_ext import convert, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import host  # noqa: E402


def main(quick, out):
    data = tasks.digits(size=32, channels=3)
    x, y = data.x_train, data.y_train
    model = models.compile_classifier(models.resnet8())
    model.fit(x, y, epochs=3 if quick else 20, batch_size=32, verbose=0)

    schedule = pruning.PolynomialDecay(0.0, 0.6, begin_step=0, end_step=40 if quick else 400,
                                       frequency=10 if quick else 50)
    pruned = models.compile_classifier(pruning.prune(model, schedule, round_to=8), 5e-4)
    pruned.fit(x, y, epochs=2 if quick else 15, batch_size=32, verbose=0,
               callbacks=[pruning.PruningCallback()])
    small = pruning.strip(pruned)  # an ordinary Keras model: no wrappers, fewer channels

    dense_int8 = convert.to_tflite(model, x[:200])
    small_int8 = convert.to_tflite(small, x[:200])
    small_int8.save(os.path.join(out, "resnet8_pruned_int8.tflite"))
    latency = host.time_interleaved({"dense": dense_int8.flatbuffer,
                                     "pruned": small_int8.flatbuffer}, data.x_test, runs=100)
    for name, result in (("dense", dense_int8), ("pruned", small_int8)):
        accuracy = host.evaluate(result.flatbuffer, data.x_test, data.y_test)["accuracy"]
        print(f"{name:>6}: {len(result.flatbuffer):>8,} bytes  {result.report['macs']:>11,} MACs  "
              f"{latency[name]:7.1f} µs  accuracy {accuracy:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke run)")
    parser.add_argument("--out", default="build/examples")
    args = parser.parse_args()
    main(args.quick, args.out)
