"""MLPerf Tiny keyword spotting (DS-CNN) to a microcontroller: int8, TFLM, C array, Ethos-U.

    python examples/keyword_spotting.py [--quick] [--out build/examples/kws]

1. Builds the MLPerf Tiny DS-CNN (49x10x1 MFCC input, 12 classes) and trains it briefly on
   synthetic MFCC-shaped data: each keyword is a fixed random time-frequency pattern, each
   sample that pattern shifted in time, scaled and buried in noise. No speech data ships
   offline, and this data is easy (the full run reaches 1.0): the accuracy shows that
   training and int8 work, not how well the model spots keywords. Put your own MFCCs
   (N, 49, 10, 1) and labels in place of `synthetic_mfcc`.
2. Converts to full int8 (calibrated on 300 training samples) and checks every op and tensor.
3. TensorFlow Lite Micro on the host: every op has a TFLM kernel, the exact smallest tensor
   arena, TFLM/LiteRT top-1 agreement on the test samples, host latency.
4. Writes `kws.c` / `kws.h`: the model as a 16-byte aligned C array and the arena size to
   declare.
5. Arm's Vela compiler estimates an Ethos-U55 (128 MAC/cycle) running it: cycles, time, SRAM
   and flash, ops on the NPU and left on the CPU.

--quick: 16 filters instead of 64, 1,500 samples instead of 4,000, 3 epochs instead of 10
(~30 s; the full run ~1.5 min on 2 cores).
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import compress, convert, models, pruning  # noqa: E402
from tflite_ext.bench import host, micro  # noqa: E402
from tflite_ext.bench.report import text_table  # noqa: E402
from tflite_ext.errors import TfliteExtError  # noqa: E402

KEYWORDS = 12  # MLPerf Tiny: 10 words, silence, unknown


def synthetic_mfcc(count, seed=0):
    """(x, y): `count` MFCC-shaped samples (49 frames x 10 coefficients) of 12 keywords."""
    rng = np.random.default_rng(seed)
    # One smooth pattern per keyword: a random walk over frames, per coefficient.
    patterns = np.cumsum(rng.normal(size=(KEYWORDS, 49, 10)), axis=1) / 4
    y = rng.integers(0, KEYWORDS, size=count)
    shifts = rng.integers(-6, 7, size=count)   # the word starts earlier or later
    gains = rng.uniform(0.6, 1.4, size=(count, 1, 1))
    x = np.stack([np.roll(patterns[k], s, axis=0) for k, s in zip(y, shifts)]) * gains
    x += rng.normal(scale=1.0, size=x.shape)
    return x[..., None].astype("float32"), y.astype("int32")


def run(out, quick):
    keras.utils.set_random_seed(0)
    x, y = synthetic_mfcc(1500 if quick else 4000)
    n_test = len(x) // 5
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]

    model = models.compile_classifier(models.ds_cnn(filters=16 if quick else 64))
    model.fit(x_train, y_train, epochs=3 if quick else 10, batch_size=32, verbose=0)
    # BatchNormalization's moving statistics (momentum 0.99) lag far behind after a few
    # hundred steps; one pass over the training data sets them (no weights change).
    pruning.recalibrate_batch_norm(model, x_train)
    keras_acc = model.evaluate(x_test, y_test, verbose=0)[1]

    result = convert.to_tflite(model, x_train[:300])     # full int8, verified
    path = result.save(os.path.join(out, "kws.tflite"))
    int8_acc = host.evaluate(path, x_test, y_test)["accuracy"]

    # TFLM: raises a one-line error naming any op without a TFLM kernel, or a float tensor.
    report = micro.analyze(path, x_test, runs=5 if quick else 50)
    header, source = micro.write_c_source(path, out, name="kws",
                                          arena_bytes=report["arena_bytes"])

    npu = compress.get_target("ethos-u55-128").measure({"kws": result.flatbuffer})["kws"]

    cpu = host.describe_cpu()
    rows = [
        ("keras float accuracy", f"{keras_acc:.4f}"),
        ("int8 accuracy (LiteRT)", f"{int8_acc:.4f}"),
        ("flash: kws.tflite = C array", f"{report['size_bytes']:,} bytes"),
        ("ops (all with TFLM kernels)", ", ".join(f"{op} x{n}" for op, n in
                                                  sorted(report["op_counts"].items()))),
        ("TFLM tensor arena (exact)", f"{report['arena_bytes']:,} bytes"),
        ("arena to declare (KWS_ARENA_SIZE)", f"{report['arena_suggestion']:,} bytes"),
        ("TFLM / LiteRT top-1 agreement", f"{report['agreement']['top1_agreement']:.4f} on "
                                          f"{report['agreement']['samples']} samples"),
        ("TFLM latency on this host", f"{report['latency']['median_us']:,.0f} µs ({cpu})"),
        ("Ethos-U55-128 cycles (vela)", f"{npu['cycles']:,}"),
        ("Ethos-U55-128 time (vela)", f"{npu['latency_us']:,.1f} µs"),
        ("Ethos-U55-128 SRAM (vela)", f"{npu['arena_bytes']:,} bytes"),
        ("Ethos-U55-128 flash (vela)", f"{npu['flash_bytes']:,} bytes"),
        ("Ethos-U55-128 ops NPU / CPU", f"{npu['npu_ops']} / {npu['cpu_ops']}"),
    ]
    print(f"\nDS-CNN keyword spotting, {len(x_train)} train / {len(x_test)} test synthetic "
          f"MFCC samples{' (quick mode)' if quick else ''}")
    print(text_table([{"what": a, "value": b} for a, b in rows],
                     [("what", "measured"), ("value", "value")]))
    print(f"wrote {path}, {source}, {header}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, few epochs")
    parser.add_argument("--out", default="build/examples/kws", help="output folder")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.quick)
    except TfliteExtError as e:  # the library's errors are one line: show just that
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
