"""TFLite Micro targets: exact arenas of the digits CNN and ResNet-8 (int8), and TFLM vs
LiteRT top-1 agreement on the digits test set.

Each arena is checked the way the issue asks: TFLM runs the model with exactly that arena and
fails with 16 bytes less.

Usage:
    python tools/bench_micro.py            # digits CNN 30 epochs (~3 min)
    python tools/bench_micro.py --epochs 1 # quicker
"""
import json
import os
import tempfile
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from tflite_ext import convert, models, tasks  # noqa: E402
from tflite_ext.bench import micro, report, variants  # noqa: E402

flags.DEFINE_integer("epochs", 30, "Digits CNN training epochs (references.md: 30).",
                     lower_bound=0)
flags.DEFINE_integer("resnet_epochs", 1, "ResNet-8 epochs (the arena does not depend on "
                     "training).", lower_bound=0)
flags.DEFINE_boolean("json", False, "Print JSON instead of a Markdown table.")
FLAGS = flags.FLAGS

COLUMNS = [("model", "model"), ("tflite_bytes", ".tflite bytes", "{:,}"),
           ("arena_bytes", "arena bytes (exact)", "{:,}"),
           ("runs_fails", "runs / fails -16"),
           ("recording_allocator_total", "recording total", "{:,}"),
           ("litert_accuracy", "LiteRT acc", "{:.4f}"),
           ("agreement", "TFLM=LiteRT top-1"), ("max_diff_steps", "max diff steps"),
           ("tflm_host_median_us", "TFLM µs", "{:.0f}")]


def measure(name, model, split, out_dir, epochs):
    start = time.time()
    if epochs:
        variants.fit(model, split, epochs=epochs, learning_rate=1e-3)
    path = convert.to_tflite(model, split.x_train[:300]).save(
        os.path.join(out_dir, f"{name}_int8.tflite"))
    r = micro.analyze(path, split.x_test, runs=20)
    arena = r["arena_bytes"]
    works, fails_16_less = micro.arena_works(path, arena), not micro.arena_works(path, arena - 16)
    return {
        "model": name, "epochs": epochs, "tflite_bytes": r["size_bytes"],
        "arena_bytes": arena, "recording_allocator_total": r["arena_report"]["total"],
        "runs_with_arena": works, "fails_with_16_less": fails_16_less,
        "arena_suggestion": r["arena_suggestion"],
        "litert_accuracy": variants.accuracy(path, split.x_test, split.y_test),
        "tflm_litert_top1_agreement": r["agreement"]["top1_agreement"],
        "max_diff_steps": r["agreement"]["max_diff_steps"], "samples": r["agreement"]["samples"],
        "tflm_host_median_us": r["latency"]["median_us"], "seconds": round(time.time() - start, 1),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    keras.utils.set_random_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        rows.append(measure("digits_cnn", models.digits_cnn(), tasks.digits(), out,
                            FLAGS.epochs))
        rows.append(measure("resnet8", models.resnet8(), tasks.digits(size=32, channels=3), out,
                            FLAGS.resnet_epochs))
    if FLAGS.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:  # the two cells that join two figures
        r["runs_fails"] = f"{r['runs_with_arena']} / {r['fails_with_16_less']}"
        r["agreement"] = f"{r['tflm_litert_top1_agreement']:.4f} ({r['samples']})"
    print(report.markdown_table(rows, COLUMNS), end="")


if __name__ == "__main__":
    app.run(main)
