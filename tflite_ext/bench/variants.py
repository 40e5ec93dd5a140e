"""Train, measure and describe model variants: what the demo and every program in tools/ share.

A program trains its float model and compressed copies with `fit` (optionally taught by the
float model), converts each to .tflite, and `measure`s them all the same way: accuracy, bytes,
gzip bytes, MACs, and LiteRT latency with every variant timed interleaved. `report.write_report`
and `report.markdown_table` then write the JSON and Markdown; `environment` says which machine
the latencies belong to.

Example:
    >>> from tflite_ext import convert, models, tasks
    >>> from tflite_ext.bench import variants
    >>> from tflite_ext.quantization import quantize_model
    >>> data = tasks.digits()
    >>> model = variants.fit(models.digits_cnn(), data, epochs=30, learning_rate=1e-3,
    ...                      label="float")
    >>> qat = variants.fit(quantize_model(model), data, epochs=5, learning_rate=3e-5,
    ...                    teacher=model, label="qat")
    >>> rows = variants.measure({"ptq": convert.to_tflite(model, data.x_train).flatbuffer,
    ...                          "qat": convert.to_tflite(qat).flatbuffer},
    ...                         data.x_test, data.y_test, keras_models={"qat": qat})
    >>> rows["qat"]["tflite_accuracy"], rows["qat"]["median_us"]
    (0.9944, 16.1)
"""
import gzip
import os
import platform
import sys
import time

import keras
import numpy as np

from tflite_ext import distillation, inspect, models
from tflite_ext.errors import InputError
from tflite_ext.bench import host


class EpochLog(keras.callbacks.Callback):
    """One progress line per epoch through `log` (rewritten in place on a terminal)."""

    def __init__(self, label, log=print):
        super().__init__()
        self.label, self.log = label, log
        # Only plain print to a terminal can rewrite its line; a logger gets every line.
        self.tty = log is print and sys.stdout.isatty()

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs, epochs = logs or {}, self.params["epochs"]
        text = (f"{self.label}: epoch {epoch + 1}/{epochs}  loss {logs.get('loss', 0):.4f}  "
                f"accuracy {logs.get('accuracy', 0):.4f}  "
                f"({time.perf_counter() - self.start:.0f} s)")
        if self.tty and epoch + 1 < epochs:
            print("\r" + text, end="", flush=True)
        else:
            self.log(("\r" if self.tty else "") + text)


def fit(model, data, *, epochs, learning_rate, batch_size=32, teacher=None, temperature=4.0,
        alpha=0.5, callbacks=(), label=None, log=print, hints=None, hint_weight=1.0):
    """Fits a logits classifier on `data`'s training split with Adam; returns `model`.

    Args:
        model: the `keras.Model` to train (float, pruned or QAT).
        data: a `tasks.Split`.
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
        teacher: if given, the model that teaches `model` (`distillation.fit`, KL at
            `temperature`, ground-truth weight `alpha`, optional `hints` and `hint_weight`);
            callbacks such as `PruningCallback`, `FreezeQuantization` and
            `DistillationSchedule` work on the student; none is added for you.
        label: if given, one `EpochLog` line per epoch through `log`.

    Example:
        >>> small = variants.fit(pruned, data, epochs=15, learning_rate=5e-4, teacher=model,
        ...                      callbacks=[pruning.PruningCallback()], label="prune")
    """
    progress = [EpochLog(label, log)] if label else []
    if teacher is not None:
        # The callers' callbacks as given (auto_callbacks=False): a pruned model they fit
        # without PruningCallback keeps its masks, as it would without a teacher.
        distillation.fit(teacher, model, data.x_train, data.y_train, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate,
                         temperature=temperature, alpha=alpha, hints=hints,
                         hint_weight=hint_weight, callbacks=[*callbacks, *progress],
                         auto_callbacks=False)
        return model
    if hints:
        raise InputError(f"hints need a teacher. Received: hints={hints!r}, teacher=None")
    models.compile_classifier(model, learning_rate)
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=batch_size, verbose=0,
              callbacks=[*callbacks, *progress])
    return model


def train_or_load(path, build, data, *, seed, **fit_args):
    """`fit(build(), data, **fit_args)` from `seed`, saved to `path`; read back if it exists.

    Sweeps over recipes reuse one float model per seed this way; `path=None` always trains.

    Example:
        >>> model = variants.train_or_load("cache/digits_seed0.keras", models.digits_cnn,
        ...                                data, seed=0, epochs=30, learning_rate=1e-3)
    """
    if path and os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(seed)
    model = fit(build(), data, **fit_args)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        model.save(path)
    return model


def top1(model, x):
    """The top-1 class per sample of a `keras.Model` or a .tflite (bytes or path, LiteRT)."""
    if isinstance(model, keras.Model):
        logits = model.predict(x, batch_size=256, verbose=0)
    else:  # inputs quantized and outputs dequantized with the model's own parameters
        logits = host.predict(model, x)
    return np.argmax(np.reshape(logits, (len(x), -1)), axis=-1)


def accuracy(model, x, y):
    """Top-1 accuracy of a `keras.Model` or a .tflite on samples `x`, integer labels `y`."""
    return float(np.mean(top1(model, x) == np.reshape(y, -1)))


def evaluate(flatbuffer, x, y, keras_model=None):
    """What every report gives of one .tflite; with its Keras model, that model's figures too.

    Returns:
        {"tflite_accuracy", "keras_accuracy", "keras_agreement" (share of samples whose top-1
        the two agree on; both None without `keras_model`), "bytes", "gzip_bytes", "macs",
        "full_integer", "ops"}.
    """
    info = inspect.summary(flatbuffer)
    predicted, y = top1(flatbuffer, x), np.reshape(y, -1)
    result = {"tflite_accuracy": float(np.mean(predicted == y)), "keras_accuracy": None,
              "keras_agreement": None, "bytes": len(flatbuffer),
              # gzip shows what unstructured sparsity saves: zeros compress, bytes stay.
              "gzip_bytes": len(gzip.compress(flatbuffer, 9)), "macs": int(info["macs"]),
              "full_integer": bool(info["full_integer"]), "ops": info["op_counts"]}
    if keras_model is not None:
        keras_top1 = top1(keras_model, x)
        result.update(keras_accuracy=float(np.mean(keras_top1 == y)),
                      keras_agreement=float(np.mean(keras_top1 == predicted)))
    return result


def measure(flatbuffers, x, y, *, keras_models=None, runs=200, warmup=10, timing_x=None,
            log=None):
    """`evaluate` for each .tflite, then LiteRT median latency of all, timed interleaved.

    Timing round-robin in one process (1 thread) spreads clock drift and background load evenly
    over the variants, so their medians compare (`host.time_interleaved`).

    Args:
        flatbuffers: {name: .tflite bytes}, in report order.
        x, y: evaluation samples and labels; `timing_x` (default `x`) feeds the timed runs.
        keras_models: {name: the keras.Model a variant was converted from}, where known.
        runs, warmup: timed and untimed invocations per variant.
        log: if given, called with one line per variant and one before timing.

    Returns:
        {name: evaluate(...) plus "median_us"}.
    """
    keras_models = keras_models or {}
    results = {}
    for name, flatbuffer in flatbuffers.items():
        results[name] = evaluate(flatbuffer, x, y, keras_models.get(name))
        if log:
            log(f"evaluated {name}: tflite accuracy {results[name]['tflite_accuracy']:.4f}, "
                f"{len(flatbuffer):,} bytes, {results[name]['macs']:,} MACs")
    if log:
        log(f"timing {len(flatbuffers)} variants interleaved, round-robin, {runs} rounds, "
            "1 thread")
    medians = host.time_interleaved(flatbuffers, x if timing_x is None else timing_x,
                                    runs=runs, warmup=warmup, num_threads=1)
    for name, median in medians.items():
        results[name]["median_us"] = median
    return results


def environment():
    """Versions and the machine a run measured on (latencies depend on the CPU)."""
    import tensorflow as tf

    from tflite_ext import __version__

    return {"tflite_ext": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu": host.describe_cpu(), "cpus": os.cpu_count()}
