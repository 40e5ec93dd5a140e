"""Quantization-aware training on Keras 3, then a verified full-int8 .tflite.

    python examples/qat_to_int8.py [--quick] [--out build/examples]

Trains the digits CNN in float, fine-tunes it with fake quantization (ranges and BatchNorm
statistics frozen for the last epochs), converts it with no calibration data and proves that
every op and tensor is integer.
"""
import os

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tflite_ext import convert, inspect, models, tasks  # noqa: E402
from tflite_ext.bench import host  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, quantize_model  # noqa: E402

flags.DEFINE_boolean("quick", False, "Few epochs (a smoke run).")
flags.DEFINE_string("out", "build/examples", "Output folder.")
FLAGS = flags.FLAGS


def main(argv):
    del argv  # flags only
    quick, out = FLAGS.quick, FLAGS.out
    data = tasks.digits()
    model = models.compile_classifier(models.digits_cnn())
    model.fit(data.x_train, data.y_train, epochs=15 if quick else 30, batch_size=32, verbose=0)

    qat = models.compile_classifier(quantize_model(model), learning_rate=3e-5)
    qat.fit(data.x_train, data.y_train, epochs=1 if quick else 5, batch_size=32, verbose=0,
            callbacks=[FreezeQuantization(freeze_after_step=20 if quick else 120)])

    result = convert.to_tflite(qat)  # the fake-quant ranges are the int8 scales
    path = result.save(os.path.join(out, "digits_qat_int8.tflite"))
    info = inspect.summary(path)
    accuracy = host.evaluate(path, data.x_test, data.y_test)["accuracy"]
    print(f"{path}: {info['size_bytes']:,} bytes, full integer: {info['full_integer']}, "
          f"test accuracy {accuracy:.4f}")
    assert info["full_integer"], info["float_ops"]


if __name__ == "__main__":
    app.run(main)
