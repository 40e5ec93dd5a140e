"""The model matrix: each stage of the pipeline tried on the models users bring.

`check(model, x)` runs every stage on one model and returns a row of `Cell`s: prune → strip
(exact?), prune + QAT → strip (exact?), QAT → full int8 without and with calibration data,
post-training full int8, TFLite Micro, and LiteRT/Keras top-1 agreement. A cell is ✅ with
its figure, or the one-line error the library gave (which names the layer and what to do);
a traceback from inside Keras or TensorFlow is a bug of ours and shows as `BUG:`.
`tools/model_zoo.py` prints the matrix for the rows in `ROWS`; the tests run a fast subset.

Example:
    >>> row = check(keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3)))
    >>> row["prune_strip"].ok, row["prune_strip"].text
    (True, '✅ 2.4e-07')
"""
import dataclasses
import time

import keras
import numpy as np

from tflite_ext.errors import TfliteExtError

STAGES = {
    "prune_strip": "prune → strip exact",
    "qat_strip": "pruned QAT → strip exact",
    "qat_int8": "QAT → int8 (no data)",
    "qat_int8_data": "QAT → int8 (calibrated)",
    "ptq_int8": "PTQ int8",
    "tflm": "TFLM runs it",
    "agreement": "LiteRT/Keras top-1",
}
EXACT = 1e-5  # strip computes what the masked model computes, to float rounding


@dataclasses.dataclass
class Cell:
    """One stage on one model: passed, what to print, seconds it took."""

    ok: bool
    text: str
    seconds: float = 0.0


class _Failed(Exception):
    """A stage ran but its result is wrong (strip not exact, not full integer)."""


def _inputs(model, samples, seed=0):
    """Random samples in [0, 1] for each input, in the model's input structure."""
    rng = np.random.default_rng(seed)
    arrays = [rng.random((samples, *[d or 8 for d in t.shape[1:]])).astype("float32")
              for t in model.inputs]
    structure = model.input
    if isinstance(structure, dict):
        return dict(zip(sorted(structure), arrays))
    return arrays[0] if len(arrays) == 1 else arrays


def _first(outputs):
    """The first output (dict outputs by sorted key, as Keras flattens them), as numpy."""
    flat = keras.tree.flatten(outputs)
    return keras.ops.convert_to_numpy(flat[0])


def _max_diff(a, b, x):
    return max(float(np.max(np.abs(keras.ops.convert_to_numpy(p) - keras.ops.convert_to_numpy(q))))
               for p, q in zip(keras.tree.flatten(a(x)), keras.tree.flatten(b(x))))


def _exact(small, big, x):
    diff = _max_diff(small, big, x)
    if not diff <= EXACT:
        raise _Failed(f"✗ max |diff| {diff:.2e} > {EXACT:g}")
    return f"✅ {diff:.1e}"


def _full_integer(result):
    if not result.report["full_integer"]:
        raise _Failed(f"✗ not full integer: {result.report['float_leaks'][:3]}")
    return f"✅ {len(result.flatbuffer):,} B"


def _decisions(y):
    y = np.reshape(y, (len(y), -1))
    return y[:, 0] > 0.5 if y.shape[1] == 1 else y.argmax(axis=1)  # a sigmoid: its threshold


def _lite_runs(flatbuffer, model, x):
    """(interpreter, output details sorted by name, one `run(i)` per sample): LiteRT on
    float samples `x`, each array fed to the input named after it (the converter keeps
    its inputs in an order of its own)."""
    from tflite_ext.bench import host

    interp = host.load_interpreter(flatbuffer)
    try:
        names = [t.name for t in model.inputs]
    except AttributeError:  # a subclassed model: one input
        names = ["input"]
    arrays = x if isinstance(x, dict) else dict(zip(names, x if isinstance(x, list) else [x]))

    def run(i):
        for detail in interp.get_input_details():
            # The converter names an input "serving_default_<name>:0".
            own = detail["name"].split(":")[0].removeprefix("serving_default_")
            name = own if own in arrays else next(iter(arrays))
            interp.set_tensor(detail["index"], host.quantize(arrays[name][i:i + 1], detail))
        interp.invoke()
    outputs = sorted(interp.get_output_details(), key=lambda d: d["name"])
    return interp, outputs, run, len(next(iter(arrays.values())))


def _lite_first_output(flatbuffer, model, x):
    """LiteRT's first output (dequantized) for float samples `x`."""
    from tflite_ext.bench import host

    interp, outputs, run, count = _lite_runs(flatbuffer, model, x)
    found = []
    for i in range(count):
        run(i)
        found.append(host.dequantize(interp.get_tensor(outputs[0]["index"]), outputs[0])[0])
    return np.stack(found)


def _int8_outputs(flatbuffer, model, x):
    """LiteRT's raw integer outputs, every output of every sample, as a list to compare."""
    interp, outputs, run, count = _lite_runs(flatbuffer, model, x)
    found = []
    for i in range(count):
        run(i)
        found += [interp.get_tensor(d["index"]).tolist() for d in outputs]
    return found


def _one_line(error):
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:300]


def _run(stage):
    """A Cell from `stage()`: its text, a library error's line, or a BUG line."""
    start = time.perf_counter()
    try:
        text, ok = stage(), True
    except _Failed as failed:
        text, ok = str(failed), False
    except TfliteExtError as error:  # the library refused, in one line: that is a result
        text, ok = _one_line(error), False
    except Exception as error:  # noqa: BLE001 - anything else is a bug to fix
        text, ok = f"BUG: {type(error).__name__}: {_one_line(error)}", False
    return Cell(ok, text, time.perf_counter() - start)


def check(model, x=None, samples=8, stages=tuple(STAGES)):
    """Runs each stage on `model` and returns {stage: Cell}.

    Args:
        model: the model under test (a keras.Model; a SavedModel folder or `.keras` path
            goes to the stages that take one, the others say why not); it is not modified.
        x: float samples in the model's input structure (random in [0, 1] by default; a
            subclassed model or a path needs them).
        samples: how many random samples when `x` is None.
        stages: which of `STAGES` to run.
    """
    from tflite_ext import convert, pruning, quantization
    from tflite_ext.bench import micro
    from tflite_ext.pruning.plan import PruningPlan

    keras_model = model if isinstance(model, keras.Model) else None
    if x is None:
        x = _inputs(keras_model, samples)
    made = {}

    def prune_strip():
        pruned = pruning.prune(model, 0.5)
        PruningPlan(pruned).apply(0.5)
        return _exact(pruning.strip(pruned), pruned, x)

    def qat_strip():
        qp = quantization.quantize_model(pruning.prune(model, 0.5))
        PruningPlan(qp).apply(0.5)
        qp(x, training=True)  # ranges observed once
        small = pruning.strip(qp)
        diff = _max_diff(small, qp, x)
        if diff <= EXACT:
            return f"✅ {diff:.1e}"
        # Fewer channels sum in another order: float rounding can flip a fake-quant step
        # deep in a big model. What strip promises is the int8 model: the same integers,
        # minus the zero channels. Integer sums do not depend on the order.
        if (_int8_outputs(convert.to_tflite(small).flatbuffer, qp, x)
                != _int8_outputs(convert.to_tflite(qp).flatbuffer, qp, x)):
            raise _Failed(f"✗ max |diff| {diff:.2e} > {EXACT:g}, int8 outputs differ")
        return f"✅ int8 identical (Keras {diff:.1e}: float rounding)"

    def qat():
        if "qat" not in made:
            made["qat"] = quantization.quantize_model(model)
            made["qat"](x, training=True)
        return made["qat"]

    def ptq():
        if "ptq" not in made:
            made["ptq"] = convert.to_tflite(model, x)
        return made["ptq"]

    def tflm():
        flatbuffer = ptq().flatbuffer
        micro.check_model(flatbuffer)  # what TFLM cannot run, named (it may abort, not fail)
        arena = micro.allocation_report(flatbuffer, len(ptq().report["inputs"]))["total"]
        return f"✅ arena {arena:,} B"

    def agreement():  # a figure, not a pass mark: untrained models have fragile top-1
        if keras_model is None:
            return "n/a (no Keras model)"
        lite = _decisions(_lite_first_output(ptq().flatbuffer, keras_model, x))
        return f"{np.mean(lite == _decisions(_first(keras_model(x)))):.2f}"

    runs = {"prune_strip": prune_strip, "qat_strip": qat_strip,
            "qat_int8": lambda: _full_integer(convert.to_tflite(qat())),
            "qat_int8_data": lambda: _full_integer(convert.to_tflite(qat(), x)),
            "ptq_int8": lambda: _full_integer(ptq()), "tflm": tflm, "agreement": agreement}
    return {stage: _run(runs[stage]) for stage in stages}


# ----------------------------------------------------------------------------- the rows

L = keras.layers


def _app(name, size, **kwargs):
    """A Keras application, built offline (`weights=None`), 10 classes, at a small input."""
    def build():
        return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                                 classes=10, **kwargs)
    return build


def _cnn(head):
    def build():
        i = keras.Input((16, 16, 3))
        x = L.Conv2D(16, 3, padding="same", activation="relu")(i)
        x = L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same")(x))
        return keras.Model(i, head(L.GlobalAveragePooling2D()(L.ReLU()(x))))
    return build


def _dict_outputs():
    i = keras.Input((16, 16, 3), name="image")
    x = L.GlobalAveragePooling2D()(L.Conv2D(16, 3, activation="relu")(i))
    return keras.Model(i, {"kind": L.Dense(5, name="kind")(x), "box": L.Dense(4, name="box")(x)})


def _list_outputs():
    i = keras.Input((16, 16, 3))
    x = L.GlobalAveragePooling2D()(L.Conv2D(16, 3, activation="relu")(i))
    return keras.Model(i, [L.Dense(5)(x), L.Dense(4)(x)])


def _two_inputs():
    a, b = keras.Input((16, 16, 3), name="a"), keras.Input((8,), name="b")
    x = L.GlobalAveragePooling2D()(L.Conv2D(16, 3, activation="relu")(a))
    x = L.Concatenate()([x, L.Dense(8, activation="relu")(b)])
    return keras.Model([a, b], L.Dense(4)(x))


def _preprocessing():
    i = keras.Input((16, 16, 3))
    norm = L.Normalization(name="normalization")
    norm.adapt(np.random.default_rng(0).random((16, 16, 16, 3)).astype("float32"))
    x = L.Conv2D(16, 3, activation="relu")(norm(L.Rescaling(1 / 255.0, name="rescaling")(i)))
    return keras.Model(i, L.Dense(4)(L.GlobalAveragePooling2D()(x)))


def _squeeze_excite():
    i = keras.Input((16, 16, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu")(i)
    s = L.Dense(4, activation="relu")(L.GlobalAveragePooling2D()(x))
    s = L.Reshape((1, 1, 16))(L.Dense(16, activation="sigmoid")(s))
    x = L.Conv2D(8, 1)(L.Multiply()([x, s]))
    return keras.Model(i, L.Dense(4)(L.GlobalAveragePooling2D()(x)))


def _odd_activations():
    i = keras.Input((16, 16, 3))
    x = L.PReLU(shared_axes=[1, 2])(L.Conv2D(16, 3)(i))
    x = L.LeakyReLU(0.1)(L.Conv2D(16, 3)(x))
    x = L.Permute((2, 1, 3))(x)
    return keras.Model(i, L.Dense(4)(L.GlobalAveragePooling2D()(x)))


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.out = L.Conv2D(8, 3), L.GlobalAveragePooling2D(), L.Dense(4)

    def call(self, x):
        return self.out(self.pool(self.conv(x)))


def _subclassed():
    """A subclassed model has no `inputs`: the row brings its samples."""
    model = SubclassedNet()
    x = np.random.default_rng(0).random((8, 16, 16, 3)).astype("float32")
    model(x)
    return model, x


ROWS = {
    "MobileNet": _app("MobileNet", 64, alpha=0.25),
    "MobileNetV2": _app("MobileNetV2", 64, alpha=0.35),
    "MobileNetV3Small": _app("MobileNetV3Small", 64, alpha=0.75),
    "EfficientNetB0": _app("EfficientNetB0", 64),
    "ResNet50": _app("ResNet50", 64),
    "DenseNet121": _app("DenseNet121", 64),
    "NASNetMobile": _app("NASNetMobile", 64),
    "Xception": _app("Xception", 71),
    "ConvNeXtTiny": _app("ConvNeXtTiny", 32),
    "softmax head": _cnn(lambda x: L.Dense(10, activation="softmax")(x)),
    "Softmax layer": _cnn(lambda x: L.Softmax()(L.Dense(10)(x))),
    "sigmoid head": _cnn(lambda x: L.Dense(1, activation="sigmoid")(x)),
    "dict outputs": _dict_outputs,
    "list outputs": _list_outputs,
    "two inputs": _two_inputs,
    "Rescaling + Normalization": _preprocessing,
    "squeeze-excitation": _squeeze_excite,
    "PReLU, LeakyReLU, Permute": _odd_activations,
    "subclassed": _subclassed,
}


def markdown(rows):
    """A Markdown table of {row name: check(...)}: one line a model, one column a stage."""
    stages = [s for s in STAGES if any(s in row for row in rows.values())]
    lines = ["| model | " + " | ".join(STAGES[s] for s in stages) + " | seconds |",
             "|---" * (len(stages) + 2) + "|"]
    for name, row in rows.items():
        cells = [row[s].text.replace("|", "\\|") if s in row else "" for s in stages]
        seconds = sum(cell.seconds for cell in row.values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n"
