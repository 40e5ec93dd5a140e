r"""The two conversion routes of `convert.to_tflite`, timed side by side on the same models.

The SavedModel route (the default: the file has a serving signature) against a traced call
(`signature=False`, what `strip_names=True` and `compress`'s candidates use), on the digits CNN
and ResNet-8 (32x32x3), each post-training quantized and quantization-aware; medians of
--runs conversions each, interleaved. Checks that `names.strip` of the two files is the
same bytes.

Usage:
    python tools/bench_convert.py [--runs 5]
"""
import os
import statistics
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from tflite_ext import convert, models, names, tasks  # noqa: E402
from tflite_ext.bench import host  # noqa: E402
from tflite_ext.quantization import calibrate, quantize_model  # noqa: E402

flags.DEFINE_integer("runs", 5, "Conversions per route and model.", lower_bound=1)
FLAGS = flags.FLAGS


def timed(model, data, **kwargs):
    began = time.perf_counter()
    flatbuffer = convert.to_tflite(model, data, **kwargs).flatbuffer
    return time.perf_counter() - began, flatbuffer


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    rows = []
    for name, build, size, channels in (("digits CNN", models.digits_cnn, 8, 1),
                                        ("ResNet-8", models.resnet8, 32, 3)):
        x = tasks.digits(size, channels).x_train[:256]
        float_model = build(x.shape[1:], 10)
        qat = calibrate(quantize_model(float_model), x)
        for way, model, data in (("PTQ", float_model, x[:100]), ("QAT", qat, None)):
            signed, traced = [], []
            for _ in range(FLAGS.runs):
                seconds, a = timed(model, data)
                signed.append(seconds)
                seconds, b = timed(model, data, signature=False)
                traced.append(seconds)
            same = names.strip(a) == names.strip(b)
            rows.append((f"{name} {way}", statistics.median(signed), statistics.median(traced),
                         len(a) - len(b), same))
    print(f"\n{host.describe_cpu()}; medians of {FLAGS.runs} conversions per route, interleaved")
    print("| model | SavedModel route s | traced (signature=False) s | speed-up | bytes less "
          "| names.strip equal |")
    print("|---|---|---|---|---|---|")
    for label, a, b, less, same in rows:
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.1f}x | {less} | {same} |")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    app.run(main)
