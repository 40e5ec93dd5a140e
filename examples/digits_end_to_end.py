"""The whole compression flow on a real task: prune, distill, QAT, cluster, int8, LUT, TFLM.

    python examples/digits_end_to_end.py [--quick] [--out build/examples/digits]

1. Trains the digits CNN (scikit-learn's 8x8 handwritten digits, 1,257 train / 540 test) in
   float: the teacher.
2. Structured pruning during `fit` (`PruningCallback` ramps 75% of each dependency group's
   channels away), the float model teaching its pruned copy (distillation); `strip` removes the
   pruned channels physically and BatchNormalization statistics are re-estimated.
3. Quantization-aware training and weight clustering in one distilled `fit` (conv2/conv3 share
   4 values per output channel, fc1 8 values); `strip_clustering` gives an ordinary model.
4. Full-int8 conversion without calibration data (the trained fake-quant ranges are the
   scales), plus a TensorFlow Lite Micro LUT copy whose few-valued weights are stored as 2-3 bit
   indices, kept only if TFLM gives bit-identical outputs on every test image, and that copy
   without tensor names (`names.strip`: TFLM never reads them), what a microcontroller flashes.
5. Test accuracy of each file on LiteRT and on TensorFlow Lite Micro, and its bytes.

Writes float32.tflite, digits_int8.tflite, digits_int8.lut.tflite and digits_micro.tflite (the
last two TFLM only: LiteRT has no kernel for their TFLM_DECODE ops) into --out. The full run
takes ~2 min on 2 cores; --quick (~30-60 s) trains a few epochs only, so its accuracy is not
representative.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402

from tflite_ext import (clustering, convert, distillation, inspect, models, names,  # noqa: E402
                        pruning, tasks)
from tflite_ext.files import atomic_write  # noqa: E402
from tflite_ext.bench import host, micro  # noqa: E402
from tflite_ext.bench.report import text_table  # noqa: E402
from tflite_ext.errors import TfliteExtError  # noqa: E402
from tflite_ext.quantization import quantize_model  # noqa: E402

# The recipe of tools/compare.py (README: 0.9895 mean test accuracy over 3 seeds; its LUT file
# 13,120 bytes, 10,664 without names).
FULL = dict(float_epochs=30, prune_epochs=15, prune_end_step=200, prune_frequency=100,
            cluster_epochs=10, cluster_update_every=50)
QUICK = dict(float_epochs=8, prune_epochs=1, prune_end_step=30, prune_frequency=10,
             cluster_epochs=1, cluster_update_every=10)
TEACHING = dict(temperature=4.0, alpha=0.5)  # alpha weighs the labels, 1 - alpha the teacher


def run(out, quick):
    cfg = QUICK if quick else FULL
    data = tasks.digits()
    x, y = data.x_train, data.y_train
    keras.utils.set_random_seed(0)

    # 1. The float teacher.
    teacher = models.compile_classifier(models.digits_cnn())
    teacher.fit(x, y, epochs=cfg["float_epochs"], batch_size=32, verbose=0)
    if quick:  # BatchNormalization's moving statistics lag after a few epochs: set them
        pruning.recalibrate_batch_norm(teacher, x)

    # 2. Structured pruning, taught by the float model; the logits keep their 10 classes.
    schedule = pruning.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=cfg["prune_end_step"],
                                       frequency=cfg["prune_frequency"])
    pruned = pruning.prune(teacher, schedule, layers=lambda layer: layer.name != "logits",
                           importance="l2", round_to=8)
    distillation.fit(teacher, pruned, x, y, epochs=cfg["prune_epochs"], learning_rate=5e-4,
                     callbacks=[pruning.PruningCallback()], **TEACHING)
    small = pruning.strip(pruned)          # an ordinary Keras model with fewer channels
    pruning.recalibrate_batch_norm(small, x)

    # 3. QAT + clustering in one distilled fit. Order: quantize_model, then cluster (the
    #    clustering wraps the kernel the QAT wrapper quantizes).
    clustered = clustering.cluster(quantize_model(small), {"conv[23]": 4, "fc1": 8},
                                   per_channel={"conv.*": True}, init="linear")
    distillation.fit(teacher, clustered, x, y, epochs=cfg["cluster_epochs"],
                     learning_rate=1e-4, **TEACHING,
                     callbacks=[clustering.ClusteringCallback(cfg["cluster_update_every"])])
    final = clustering.strip_clustering(clustered)

    # 4. int8 (no calibration data: QAT's ranges) and the LUT copy, proven on the test images.
    float_path = convert.to_tflite(teacher, mode="float32").save(
        os.path.join(out, "float32.tflite"))
    result = convert.to_tflite(final, lut=True, lut_data=data.x_test)
    int8_path = result.save(os.path.join(out, "digits_int8.tflite"))
    lut_path = convert.lut_path(int8_path)
    micro_path = atomic_write(os.path.join(out, "digits_micro.tflite"),
                              names.strip(result.lut.flatbuffer))
    if not inspect.summary(int8_path)["full_integer"]:
        raise SystemExit(f"{int8_path} is not full integer")

    # 5. Accuracy on each runtime, bytes of each file.
    x_test, y_test = data.x_test, data.y_test
    float_acc = host.evaluate(float_path, x_test, y_test)["accuracy"]
    rows = [
        {"file": os.path.basename(float_path), "what": "float teacher",
         "bytes": os.path.getsize(float_path), "litert": f"{float_acc:.4f}", "tflm": "n/a"},
        {"file": os.path.basename(int8_path), "what": "pruned + QAT + clustered, int8",
         "bytes": os.path.getsize(int8_path),
         "litert": f"{host.evaluate(int8_path, x_test, y_test)['accuracy']:.4f}",
         "tflm": f"{micro.evaluate(result.flatbuffer, x_test, y_test)['accuracy']:.4f}"},
        {"file": os.path.basename(lut_path), "what": "the same, LUT-compressed weights",
         "bytes": os.path.getsize(lut_path), "litert": "n/a (no TFLM_DECODE)",
         "tflm": f"{micro.evaluate(result.lut.flatbuffer, x_test, y_test)['accuracy']:.4f}"},
        {"file": os.path.basename(micro_path), "what": "the same, no tensor names",
         "bytes": os.path.getsize(micro_path), "litert": "n/a (no TFLM_DECODE)",
         "tflm": f"{micro.evaluate(micro_path, x_test, y_test)['accuracy']:.4f}"},
    ]
    print(f"\ndigits CNN{' (quick mode)' if quick else ''}: test accuracy on "
          f"{len(y_test)} images; LUT outputs bit-identical to int8 in TFLM on "
          f"{result.lut.report['verified']['samples']} of them")
    print(text_table(rows, [("what", "model"), ("file", "file"), ("bytes", "bytes"),
                            ("litert", "LiteRT acc"), ("tflm", "TFLM acc")]))
    print(f"float -> LUT file: {rows[0]['bytes'] / rows[2]['bytes']:.1f}x smaller; without "
          f"names {rows[0]['bytes'] / rows[3]['bytes']:.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke run)")
    parser.add_argument("--out", default="build/examples/digits", help="output folder")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.quick)
    except TfliteExtError as e:  # the library's errors are one line: show just that
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
