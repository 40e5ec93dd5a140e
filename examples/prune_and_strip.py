"""Structured pruning in model.fit, then strip: a .tflite that is really smaller and faster.

    python examples/prune_and_strip.py [--quick] [--out build/examples]

Trains ResNet-8 (MLPerf Tiny) on the digits upsampled to 32x32x3, removes whole filters with a
polynomial schedule (residual branches lose the same channels), strips them physically and
converts both models to full int8 so sizes, MACs and latency can be compared side by side.
"""
import os

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tflite_ext import convert, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import variants  # noqa: E402

flags.DEFINE_boolean("quick", False, "Few epochs (a smoke run).")
flags.DEFINE_string("out", "build/examples", "Output folder.")
FLAGS = flags.FLAGS


def main(argv):
    del argv  # flags only
    quick, out = FLAGS.quick, FLAGS.out
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
    # Accuracy, bytes and MACs of each .tflite; LiteRT latency with the two timed interleaved.
    measured = variants.measure({"dense": dense_int8.flatbuffer,
                                 "pruned": small_int8.flatbuffer}, data.x_test, data.y_test,
                                runs=100)
    for name, m in measured.items():
        print(f"{name:>6}: {m['bytes']:>8,} bytes  {m['macs']:>11,} MACs  "
              f"{m['median_us']:7.1f} µs  accuracy {m['tflite_accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
