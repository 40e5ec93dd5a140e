"""Pruning + QAT on the digits CNN of references.md: prints bytes and int8 accuracy (issue 4).

Float: Adam 1e-3, 30 epochs, batch 32. PTQ: full int8 calibrated on 300 training images.
Pruning: PolynomialDecay(0.0, 0.75, 0, 400, frequency=50), round_to=8, l2, local.

(a) prune -> strip -> QAT: 15 pruning epochs at Adam 5e-4, `strip`, `quantize_model`, 5 QAT
    epochs at 3e-5 with `FreezeQuantization` after 3 epochs, convert.
(b) prune + QAT in one fit: `quantize_model(prune(model))`, one fit of 15 + 5 epochs with
    `PruningCallback` and `FreezeQuantization` (after 15 + 3 epochs); the learning rate is 5e-4
    for the first 15 epochs and 3e-5 for the last 5 (same budget as (a)). Then `strip` (exact
    on a QAT model: it drops the zero channels and keeps the ranges) and convert.
QAT models are converted with no representative data.

Usage:
    PYTHONPATH=. python tools/bench_prune_qat.py [--seed 0] [--float_epochs 30]
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from tflite_ext import convert, inspect, models, pruning, tasks  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, quantize_model  # noqa: E402

SIZE_TARGET = 27_797  # 1/10 of tfmot's 80%-pruned int8 digits model (references.md)


def tflite_top1(flatbuffer, x):
    """Top-1 of an int8-I/O model over all of `x` in one batch (LiteRT)."""
    interpreter = Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero = inp["quantization"]
    interpreter.set_tensor(inp["index"],
                           np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).argmax(-1)


def schedule():
    return pruning.PolynomialDecay(0.0, 0.75, 0, 400, frequency=50)


def prune(model):
    return pruning.prune(model, schedule(), round_to=8, importance="l2", scope="local")


def report(name, qat, data, seconds):
    """Converts a QAT model, prints and returns (int8 acc, bytes, agreement)."""
    flatbuffer = convert.to_tflite(qat).flatbuffer
    info = inspect.summary(flatbuffer)
    keras_top1 = qat.predict(data.x_test, verbose=0).argmax(-1)
    top1 = tflite_top1(flatbuffer, data.x_test)
    acc, agree = np.mean(top1 == data.y_test), np.mean(top1 == keras_top1)
    print(f"{name:<34} int8 acc {acc:.4f}  keras acc {np.mean(keras_top1 == data.y_test):.4f}"
          f"  {len(flatbuffer):>9,} bytes  MACs {info['macs']:>9,}  agree {agree:.4f}"
          f"  full_integer={info['full_integer']}  ({seconds:.0f} s)")
    return acc, len(flatbuffer), agree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float_epochs", type=int, default=30)
    parser.add_argument("--prune_epochs", type=int, default=15)
    parser.add_argument("--qat_epochs", type=int, default=5)
    parser.add_argument("--freeze_epoch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    data = tasks.digits()
    steps = int(np.ceil(len(data.x_train) / 32))
    fit = dict(batch_size=32, verbose=0)

    start = time.time()
    model = models.compile_classifier(models.digits_cnn(), 1e-3)
    model.fit(data.x_train, data.y_train, epochs=args.float_epochs, **fit)
    float_acc = model.evaluate(data.x_test, data.y_test, verbose=0)[1]
    print(f"{'float':<34} acc {float_acc:.4f}  ({time.time() - start:.0f} s)")
    ptq = convert.to_tflite(model, data.x_train[:300]).flatbuffer
    ptq_acc = np.mean(tflite_top1(ptq, data.x_test) == data.y_test)
    print(f"{'PTQ int8':<34} int8 acc {ptq_acc:.4f}  {len(ptq):>9,} bytes")

    # (a) prune -> strip -> QAT
    start = time.time()
    pruned = models.compile_classifier(prune(model), 5e-4)
    pruned.fit(data.x_train, data.y_train, epochs=args.prune_epochs,
               callbacks=[pruning.PruningCallback()], **fit)
    qat = models.compile_classifier(quantize_model(pruning.strip(pruned)), 3e-5)
    qat.fit(data.x_train, data.y_train, epochs=args.qat_epochs,
            callbacks=[FreezeQuantization(args.freeze_epoch * steps)], **fit)
    results = {"a": report("(a) prune -> strip -> QAT -> int8", qat, data,
                           time.time() - start)}

    # (b) prune + QAT in one fit
    start = time.time()
    qat = models.compile_classifier(quantize_model(prune(model)), 5e-4)
    total = args.prune_epochs + args.qat_epochs
    lr = keras.callbacks.LearningRateScheduler(
        lambda epoch, _: 5e-4 if epoch < args.prune_epochs else 3e-5)
    freeze = FreezeQuantization((args.prune_epochs + args.freeze_epoch) * steps)
    qat.fit(data.x_train, data.y_train, epochs=total,
            callbacks=[pruning.PruningCallback(), freeze, lr], **fit)
    seconds = time.time() - start
    report("(b) prune+QAT one fit -> int8", qat, data, seconds)  # unstripped: zeros
    results["b"] = report("(b) ... -> strip -> int8", pruning.strip(qat), data, seconds)

    for key, (acc, size, agree) in results.items():
        print(f"targets ({key}): int8 >= PTQ int8: {acc >= ptq_acc} | int8 >= float - 0.3 pt: "
              f"{acc >= float_acc - 0.003 - 1e-9} | agreement >= 99.5%: {agree >= 0.995} | "
              f"bytes <= {SIZE_TARGET:,}: {size <= SIZE_TARGET}")


if __name__ == "__main__":
    main()
