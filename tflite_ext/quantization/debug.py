"""Per-layer quantization error: the int8 `.tflite` against the float Keras model.

Like TF's QuantizationDebugger, but on LiteRT and Keras 3: every intermediate int8 tensor of
the flatbuffer (kept alive by `experimental_preserve_all_tensors=True`) is dequantized and
compared with the Keras layer output it computes. Tensors are matched to layers by shape,
then by the layer names TFLite writes into tensor names, then by the smallest error. Each row
gives the RMSE, the RMSE in quantization steps (RMSE / scale), the RMSE relative to the float
signal, and the relative error *added* by that op (its error minus the worst of its inputs'):
the last one names the layers quantization hurts most.

Example:
    >>> from tflite_ext.quantization import debug
    >>> report = debug.layer_error_report(float_model, "model.tflite", x_test[:100])
    >>> report["worst"]               # layer names, most added error first
    ['fc1', 'conv3', 'relu2']
    >>> print(debug.render_markdown(report))
"""
import re

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tflite_ext import inspect
from tflite_ext.errors import InputError
from tflite_ext.files import read_model_bytes

_QUANTIZED = ("int8", "uint8", "int16")
_WRAPPING = re.compile(r"^(quant_)?(?P<name>.+?)(_act|_quant)?(_\d+)?$")


def _keras_outputs(model, x):
    """{layer name: float output (numpy)} for every single-output, non-input layer."""
    chosen = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
              and not isinstance(layer.output, (list, tuple))]
    features = keras.Model(model.inputs, [layer.output for layer in chosen])
    values = features.predict(x, verbose=0)
    values = values if isinstance(values, list) else [values]
    return {layer.name: np.asarray(v, np.float32) for layer, v in zip(chosen, values)}


def _name_hints(tensor_name, layer_names):
    """Keras layer names that appear as path components of a TFLite tensor name."""
    hints = set()
    for token in re.split(r"[/;:]", tensor_name):
        for candidate in (token, _WRAPPING.match(token).group("name") if token else ""):
            if candidate in layer_names:
                hints.add(candidate)
    return hints


def _run_tflite(flatbuffer, x):
    interpreter = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], [len(x), *x.shape[1:]])
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    scale, zero = detail["quantization"]
    if np.issubdtype(detail["dtype"], np.integer) and scale:
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max)
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter


def layer_error_report(float_model, tflite_model, data, max_samples=200):
    """Per-tensor RMSE of an integer `.tflite` against the float Keras model it came from.

    Args:
        float_model: the float `keras.Model` (single input) the flatbuffer was made from (or
            its QAT copy run in float: any model whose layer outputs mean the same).
        tflite_model: flatbuffer bytes or a `.tflite` path.
        data: float inputs, numpy array (N, *input_shape); at most `max_samples` are used.
        max_samples: samples to compare.

    Returns:
        dict with "rows" (one per matched integer tensor, in execution order: tensor, op,
        layer, shape, scale, zero_point, rmse, rmse_steps, relative_rmse, added_error,
        max_abs_error), "worst" (layer names by added error, largest first) and "samples".
    """
    data = np.asarray(data, np.float32)
    if data.ndim < 2 or not np.all(np.isfinite(data)):
        raise InputError("data must be a finite float array (N, *input_shape). Received: "
                         f"data with shape {data.shape}")
    expected = tuple(float_model.inputs[0].shape[1:])
    if tuple(data.shape[1:]) != expected:
        raise InputError(f"data samples must have the model's input shape {expected}. "
                         f"Received: data.shape={data.shape}")
    data = data[:max_samples]
    flatbuffer = (bytes(tflite_model) if isinstance(tflite_model, (bytes, bytearray))
                  else read_model_bytes(tflite_model))
    info = inspect.summary(flatbuffer)
    reference = _keras_outputs(float_model, data)
    interpreter = _run_tflite(flatbuffer, data)
    # The interpreter's tensor indices are those of the main subgraph (0).
    tensors = {t["index"]: t for t in info["tensors"] if t["subgraph"] == 0}
    error_of = {}  # tensor index -> relative rmse, to compute what each op adds
    rows = []
    for op in (op for op in info["operators"] if op["subgraph"] == 0):
        for index in op["outputs"]:
            tensor = tensors[index]
            quant = tensor["quantization"]
            if tensor["dtype"] not in _QUANTIZED or not quant or len(quant["scale"]) != 1:
                continue
            scale, zero = quant["scale"][0], quant["zero_point"][0]
            value = (interpreter.get_tensor(index).astype(np.float32) - zero) * scale
            row = _match(tensor, value, reference)
            if row is None:
                continue
            inputs_error = max((error_of.get(i, 0.0) for i in op["inputs"]), default=0.0)
            error_of[index] = row["relative_rmse"]
            row.update(tensor=tensor["name"], op=op["op"], scale=scale, zero_point=zero,
                       rmse_steps=row["rmse"] / scale,
                       added_error=row["relative_rmse"] - inputs_error)
            rows.append(row)
    by_layer = {}
    for row in rows:
        by_layer[row["layer"]] = max(by_layer.get(row["layer"], -np.inf), row["added_error"])
    worst = sorted(by_layer, key=by_layer.get, reverse=True)
    return {"rows": rows, "worst": worst, "samples": len(data)}


def _match(tensor, value, reference):
    """The Keras layer output closest to this tensor (same shape; named ones first)."""
    same_shape = {name: ref for name, ref in reference.items()
                  if ref.shape[1:] == value.shape[1:]}
    if not same_shape:
        return None
    hinted = _name_hints(tensor["name"], same_shape) or set(same_shape)
    best = None
    for name in sorted(hinted):
        ref = same_shape[name]
        rmse = float(np.sqrt(np.mean((value - ref) ** 2)))
        if best is None or rmse < best["rmse"]:
            signal = float(np.sqrt(np.mean(ref ** 2)))
            best = {"layer": name, "shape": list(value.shape[1:]), "rmse": rmse,
                    "relative_rmse": rmse / signal if signal > 0 else float(rmse > 0),
                    "max_abs_error": float(np.max(np.abs(value - ref)))}
    return best


def render_markdown(report, top=None):
    """A Markdown table of the report, rows by added error (all rows, or the `top` worst)."""
    rows = sorted(report["rows"], key=lambda r: r["added_error"], reverse=True)
    rows = rows[:top] if top else rows
    lines = [f"Quantization error per tensor ({report['samples']} samples; added = relative "
             "RMSE minus the worst input's)", "",
             "| layer | op | shape | scale | RMSE | RMSE / scale | relative RMSE | added |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['op']} | {'x'.join(map(str, r['shape']))} | "
                     f"{r['scale']:.4g} | {r['rmse']:.4g} | {r['rmse_steps']:.2f} | "
                     f"{r['relative_rmse']:.2%} | {r['added_error']:+.2%} |")
    return "\n".join(lines)
