"""Your own trained Keras model (.keras or legacy .h5) through `compress`, to a flash budget.

    python examples/your_own_model.py MODEL.keras --data train.npz --val val.npz \\
        [--flash 0.5] [--target host] [--epochs 10] [--out build/examples/own]
    python examples/your_own_model.py --quick [--out DIR]

MODEL: a trained classifier that outputs logits (functional or Sequential; no softmax on the
last layer), saved with `model.save("m.keras")` or `model.save("m.h5")`. train.npz / val.npz:
arrays `x` (samples shaped like the model's input) and `y` (integer labels), e.g.
`np.savez("train.npz", x=x_train, y=y_train)`. `compress` decides on --val: keep a test split
apart for the figures you report.

--flash: the budget for the .tflite, as a fraction of the unchanged int8 model (0.5 = half) or
as a size (64KB, 20000). --target: where the rest is measured (host, reference, micro,
ethos-u55-128; flash is the flatbuffer's bytes on each except Ethos-U, where it is vela's).

Writes model.tflite (verified full int8), model.keras, plan.json and report.md in --out.

--quick with no MODEL: trains a small Sequential CNN on the digits for a few epochs, saves it
as both `own.h5` (Keras' legacy HDF5 format) and `own.keras` plus train.npz / val.npz in --out,
and compresses each file (into --out/h5 and --out/keras), so both load paths run.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import compress, convert, tasks  # noqa: E402
from tflite_ext.bench.report import text_table  # noqa: E402
from tflite_ext.compress import Budget  # noqa: E402
from tflite_ext.errors import InputError, TfliteExtError  # noqa: E402


def flash_budget(text, base_bytes):
    """--flash as a Budget: a fraction (<= 1) of the int8 model's bytes, or a size."""
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and 0 < fraction <= 1:
        return Budget(flash_bytes=int(fraction * base_bytes))
    return Budget.parse(flash=text)  # "64KB", "20000": one-line InputError if malformed


def make_quick_model(out):
    """A small Sequential CNN trained briefly on the digits, saved as .h5 and .keras."""
    data = tasks.digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),           # logits
    ], name="own")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, epochs=5, batch_size=32, verbose=0)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "own.h5"), os.path.join(out, "own.keras")]
    # .keras first: in Keras 3.15, a .keras saved after an .h5 save of the same model loses
    # its optimizer (it loads with RMSprop, and a warning). .h5: Keras' legacy HDF5 format.
    for path in reversed(paths):
        model.save(path)
    np.savez(os.path.join(out, "train.npz"), x=data.x_train, y=data.y_train)
    np.savez(os.path.join(out, "val.npz"), x=data.x_test, y=data.y_test)
    return paths, os.path.join(out, "train.npz"), os.path.join(out, "val.npz")


def compress_file(path, train, val, args, out):
    """One model file through compress; returns its row for the table."""
    model = convert.load_model(path)        # .keras or .h5; one-line ModelFileError if not
    with np.load(train) as f:
        calibration = f["x"][:300]
    base_bytes = len(convert.to_tflite(model, calibration).flatbuffer)
    budget = flash_budget(args.flash, base_bytes)
    # quick: each group at 50% only, one fine-tune epoch, any accuracy drop accepted.
    search = dict(settings=(0.5,), rank_fractions=(), shortlist=1, epochs=1,
                  max_accuracy_drop=100.0) if args.quick \
        else dict(epochs=args.epochs, max_accuracy_drop=args.max_drop)
    result = compress(model, train, val, budget, target=args.target, out_dir=out,
                      log=print if args.verbose else None, **search)
    plan = (result.plan["prune"] or {"group_sparsity": {}})["group_sparsity"]  # None: no pruning
    return {"file": os.path.basename(path), "base": base_bytes, "budget": budget.flash_bytes,
            "bytes": result.measured["flash_bytes"], "macs": result.measured["macs"],
            "base_acc": result.base_accuracy, "acc": result.accuracy,
            "plan": ", ".join(f"{g}: {s:g}" for g, s in plan.items() if g != ".*"),
            "out": out}


def run(args):
    if args.model is None:
        if not args.quick:
            raise InputError("MODEL is required (or --quick to make one). Received: no MODEL")
        paths, train, val = make_quick_model(args.out)
        outs = [os.path.join(args.out, "h5"), os.path.join(args.out, "keras")]
    else:
        if args.data is None or args.val is None:
            raise InputError("--data and --val are required with MODEL. Received: "
                             f"--data={args.data!r}, --val={args.val!r}")
        paths, train, val, outs = [args.model], args.data, args.val, [args.out]
    rows = [compress_file(p, train, val, args, o) for p, o in zip(paths, outs)]
    print(f"\nflash budget {args.flash} on {args.target}{' (quick mode)' if args.quick else ''}")
    print(text_table(rows, [("file", "model file"), ("base", "int8 bytes", "{:,}"),
                            ("budget", "budget bytes", "{:,}"),
                            ("bytes", "compressed bytes", "{:,}"), ("macs", "MACs", "{:,}"),
                            ("base_acc", "int8 val acc", "{:.4f}"),
                            ("acc", "compressed val acc", "{:.4f}"), ("plan", "plan")]))
    for row in rows:
        print(f"wrote {os.path.join(row['out'], 'model.tflite')}, model.keras, plan.json, "
              "report.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="MODEL.keras or MODEL.h5")
    parser.add_argument("--data", help="training data: .npz with x and y")
    parser.add_argument("--val", help="validation data compress decides on: .npz with x, y")
    parser.add_argument("--flash", default="0.5",
                        help="flash budget: a fraction of the int8 model (0.5) or a size (64KB)")
    parser.add_argument("--target", default="host",
                        help="host[:THREADS], reference, micro, ethos-u55-128, ...")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tune epochs per plan")
    parser.add_argument("--max_drop", type=float, default=1.0,
                        help="validation accuracy points the result may lose")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run; with no MODEL, make one (.h5 and .keras)")
    parser.add_argument("--verbose", action="store_true", help="log the search")
    parser.add_argument("--out", default="build/examples/own", help="output folder")
    args = parser.parse_args(argv)
    try:
        run(args)
    except TfliteExtError as e:  # one line, e.g. a BudgetError with the closest plan reached
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
