"""The model matrix: every stage of the pipeline on the models users bring, in one table.

Rows: Keras applications built offline (`weights=None`, small inputs, 10 classes), heads and
structures users have (softmax, sigmoid, dict/list outputs, two inputs, preprocessing layers,
squeeze-excitation, PReLU/LeakyReLU/Permute), a subclassed model, a Keras 2 `.h5` file
(written by tf_keras in its own process, loaded with Keras 3) and a SavedModel folder.
Columns: `tflite_ext.bench.zoo.STAGES`. A cell is ✅ with its figure or the one-line error
the library gave; `BUG:` marks a traceback from inside Keras/TensorFlow (a bug of ours).
Models are untrained: agreement is a figure, not a mark. Writes model_zoo.json and .md.

Example:
    python tools/model_zoo.py
    python tools/model_zoo.py --rows MobileNetV2 --rows "softmax head" --out build/zoo
"""
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# oneDNN's strided 1x1 conv gradient crash (uxlfoundation/oneDNN#6035) does not matter here
# (no training), but the matrix should not depend on it either.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

flags.DEFINE_multi_string("rows", None, "Rows to run (default: all).")
flags.DEFINE_string("out", "build/model_zoo", "Folder for model_zoo.json and model_zoo.md.")
FLAGS = flags.FLAGS

# Written by tf_keras (Keras 2) in its own process: a user's legacy .h5 file.
_KERAS2_H5 = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tf_keras as k
i = k.Input((16, 16, 3))
x = k.layers.BatchNormalization()(k.layers.Conv2D(16, 3, padding="same", use_bias=False)(i))
x = k.layers.MaxPooling2D()(k.layers.ReLU()(x))
x = k.layers.Dense(10, activation="softmax")(k.layers.GlobalAveragePooling2D()(x))
k.Model(i, x).save(sys.argv[1])
"""


def _keras2_h5(folder):
    import keras

    path = os.path.join(folder, "keras2.h5")
    subprocess.run([sys.executable, "-c", _KERAS2_H5, path], check=True,
                   capture_output=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    return keras.saving.load_model(path, compile=False)


def _saved_model(folder):
    """A SavedModel folder, and samples for it (it has no Keras model to read shapes from)."""
    import numpy as np

    from tflite_ext.bench import zoo

    path = os.path.join(folder, "saved_model")
    zoo.ROWS["softmax head"]().export(path, verbose=False)
    return path, np.random.default_rng(0).random((8, 16, 16, 3)).astype("float32")


def main(argv):
    del argv
    from tflite_ext.bench import host, report, zoo

    folder = tempfile.mkdtemp(prefix="model_zoo_")
    rows = {**zoo.ROWS, "Keras 2 .h5 (tf_keras)": lambda: _keras2_h5(folder),
            "SavedModel folder": lambda: _saved_model(folder)}
    chosen = FLAGS.rows or list(rows)
    unknown = [name for name in chosen if name not in rows]
    if unknown:
        raise app.UsageError(f"unknown row(s) {unknown}; rows are {list(rows)}")
    results, start = {}, time.perf_counter()
    for name in chosen:
        made = rows[name]()
        model, x = made if isinstance(made, tuple) else (made, None)
        results[name] = zoo.check(model, x)
        failed = [s for s, cell in results[name].items() if not cell.ok]
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: "
              f"{len(results[name]) - len(failed)} of {len(results[name])} stages ✅", flush=True)
    table = zoo.markdown(results)
    text = (f"# Model matrix\n\nCPU: {host.describe_cpu()}; "
            f"{time.perf_counter() - start:.0f} s in all.\n\n{table}")
    print("\n" + table)
    data = {name: {s: vars(cell) for s, cell in row.items()} for name, row in results.items()}
    report.write_report(FLAGS.out, "model_zoo", data, text)
    print(f"wrote {FLAGS.out}/model_zoo.json and model_zoo.md")


if __name__ == "__main__":
    app.run(main)
