"""A keyword-spotting DS-CNN for a microcontroller: int8, TFLM arena, C array.

    python examples/micro_export.py [--quick] [--out build/examples/ds_cnn]

Builds the MLPerf Tiny DS-CNN (49x10 MFCC input), calibrates it on synthetic features (no
speech data ships offline, so accuracy is not the point here), converts to full int8, checks
every op against TensorFlow Lite Micro, finds the exact tensor arena and writes `ds_cnn.c` /
`ds_cnn.h` ready for an MCU project.
"""
import os

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from tflite_ext import convert, models  # noqa: E402
from tflite_ext.bench import micro  # noqa: E402

flags.DEFINE_boolean("quick", False, "A smaller model (a smoke run).")
flags.DEFINE_string("out", "build/examples/ds_cnn", "Output folder.")
FLAGS = flags.FLAGS


def main(argv):
    del argv  # flags only
    quick, out = FLAGS.quick, FLAGS.out
    model = models.ds_cnn(filters=16 if quick else 64)
    features = np.random.default_rng(0).normal(size=(100, 49, 10, 1)).astype("float32")
    result = convert.to_tflite(model, features)
    path = result.save(os.path.join(out, "ds_cnn.tflite"))
    report = micro.analyze(path, features, runs=3 if quick else 20,
                           agreement_samples=8 if quick else 50)
    micro.write_c_source(result.flatbuffer, out, name="ds_cnn",
                         arena_bytes=report["arena_suggestion"])
    print(f"{path}: {len(result.flatbuffer):,} bytes flash, exact arena "
          f"{report['arena_bytes']:,} bytes, TFLM/LiteRT top-1 agreement "
          f"{report['agreement']['top1_agreement']:.3f}; C source in {out}")


if __name__ == "__main__":
    app.run(main)
