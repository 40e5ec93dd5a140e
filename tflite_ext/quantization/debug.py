"""Per-layer quantization error: the int8 `.tflite` against the float Keras model.

Like TF's QuantizationDebugger, but on LiteRT and Keras 3: every intermediate int8 tensor of
the flatbuffer (kept alive by `experimental_preserve_all_tensors=True`) is dequantized and
compared with the Keras layer output it computes. A tensor is matched to a layer only where it
is that layer's output: the model outputs by the signature's order, every other tensor by the
layer names TFLite writes into tensor names (the last tensor naming a layer, with its output
shape, is its output). Tensors no layer outputs (a SeparableConv2D's depthwise half) are listed
as "unmatched", never compared with some other layer that happens to share their shape. Each row
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
    """({layer name: float output}, [layer name of each model output]), layers in graph order.

    Covers every single-output, non-input layer called once (a shared layer has no one output).
    """
    def single_output(layer):
        try:
            return not isinstance(layer.output, (list, tuple))
        except (AttributeError, ValueError):  # called more than once
            return False

    chosen = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
              and single_output(layer)]
    features = keras.Model(model.inputs, [layer.output for layer in chosen])
    values = features.predict(x, verbose=0)
    values = values if isinstance(values, list) else [values]
    outputs = [next((layer.name for layer in chosen if layer.output is out), None)
               for out in model.outputs]
    return {layer.name: np.asarray(v, np.float32) for layer, v in zip(chosen, values)}, outputs


def _name_hints(tensor_name, layer_names):
    """Keras layer names that appear as path components of a TFLite tensor name.

    A component is the layer name as written, with TF's "_1" scope suffix, or that of a QAT
    copy's wrapper or quantizer ("quant_conv1_1", "relu1_act_1" both name "conv1"/"relu1").
    """
    hints = set()
    for token in filter(None, re.split(r"[/;:]", tensor_name)):
        for candidate in (token, re.sub(r"_\d+$", "", token), _WRAPPING.match(token)["name"]):
            if candidate in layer_names:
                hints.add(candidate)
    return hints


def _output_tensors(flatbuffer, info, count):
    """Tensor index of each Keras model output: by the signature's output_<i> names (the
    flatbuffer's own output order is not Keras'), positional for a single output."""
    try:
        details = Interpreter(model_content=flatbuffer).get_signature_runner() \
            .get_output_details()
        by_name = {name: d["index"] for name, d in details.items()}
    except ValueError:  # no signature (a flatbuffer made from concrete functions)
        by_name = {}
    indices = [by_name.get(f"output_{i}") for i in range(count)]
    if None not in indices:
        return indices
    return [info["outputs"][0]["index"]] if count == 1 == len(info["outputs"]) else []


def _owners(ops, tensors, reference, output_layers, output_indices):
    """{tensor index: name of the Keras layer whose output it is}, only where that is known.

    A model output is its output layer's (through a float output's DEQUANTIZE: the int8 tensor
    before it). Otherwise a layer's output is the last tensor, in execution order, that names
    the layer and has its output shape: earlier ones are its intermediates (a SeparableConv2D's
    depthwise half names the layer too). A tensor that is the output of several layers (conv,
    BN and ReLU fused into one op) is the last of those layers'.
    """
    producer = {index: op for op in ops for index in op["outputs"]}
    claimed = {}  # layer name -> tensor index
    for op in ops:
        for index in op["outputs"]:
            shape = tuple(tensors[index]["shape"][1:])
            for name in _name_hints(tensors[index]["name"], reference):
                if reference[name].shape[1:] == shape:
                    claimed[name] = index
    for layer, index in zip(output_layers, output_indices):
        if layer is None:
            continue
        op = producer.get(index)
        if op is not None and op["op"] == "DEQUANTIZE":
            index = op["inputs"][0]
        claimed[layer] = index
    order = {name: i for i, name in enumerate(reference)}
    owners = {}
    for name, index in claimed.items():
        if index not in owners or order[name] > order[owners[index]]:
            owners[index] = name
    return owners


def _interpreter(flatbuffer, batch):
    interpreter = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True)
    detail = interpreter.get_input_details()[0]
    if detail["shape"][0] != batch:
        interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def _run_tflite(flatbuffer, x, indices):
    """{tensor index: its values for all of x}, every tensor kept alive.

    The whole batch runs at once where the model takes a new batch size; one converted at
    batch 1 with a fixed-shape RESHAPE (a Flatten) cannot be resized, so it runs per sample.
    """
    try:
        interpreter, chunks = _interpreter(flatbuffer, len(x)), [x]
    except RuntimeError:  # "XNNPack delegate failed to reshape ..." (or the builtin kernel's)
        interpreter, chunks = _interpreter(flatbuffer, 1), [x[k:k + 1] for k in range(len(x))]
    detail = interpreter.get_input_details()[0]
    scale, zero = detail["quantization"]
    values = {index: [] for index in indices}
    for chunk in chunks:
        if np.issubdtype(detail["dtype"], np.integer) and scale:
            info = np.iinfo(detail["dtype"])
            chunk = np.clip(np.round(chunk / scale + zero), info.min, info.max)
        interpreter.set_tensor(detail["index"], chunk.astype(detail["dtype"]))
        interpreter.invoke()
        for index in indices:
            values[index].append(interpreter.get_tensor(index))
    return {index: np.concatenate(v) for index, v in values.items()}


def layer_error_report(float_model, tflite_model, data, max_samples=200):
    """Per-tensor RMSE of an integer `.tflite` against the float Keras model it came from.

    Args:
        float_model: the float `keras.Model` (single input) the flatbuffer was made from (or
            its QAT copy run in float: any model whose layer outputs mean the same).
        tflite_model: flatbuffer bytes or a `.tflite` path.
        data: float inputs, numpy array (N, *input_shape); at most `max_samples` are used.
        max_samples: samples to compare.

    Returns:
        dict with "rows" (one per integer tensor that is a Keras layer's output, in execution
        order: tensor, op, layer, shape, scale, zero_point, rmse, rmse_steps, relative_rmse,
        added_error, max_abs_error), "worst" (layer names by added error, largest first),
        "unmatched" (integer tensors no Keras layer outputs, e.g. a SeparableConv2D's depthwise
        half: not compared) and "samples".
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
    reference, output_layers = _keras_outputs(float_model, data)
    # The interpreter's tensor indices are those of the main subgraph (0).
    tensors = {t["index"]: t for t in info["tensors"] if t["subgraph"] == 0}
    ops = [op for op in info["operators"] if op["subgraph"] == 0]
    owners = _owners(ops, tensors, reference, output_layers,
                     _output_tensors(flatbuffer, info, len(output_layers)))
    values = _run_tflite(flatbuffer, data, sorted(owners))
    error_of = {}  # tensor index -> relative rmse, to compute what each op adds
    rows, unmatched = [], []
    for op in ops:
        inputs_error = max((error_of.get(i, 0.0) for i in op["inputs"]), default=0.0)
        for index in op["outputs"]:
            tensor = tensors[index]
            quant = tensor["quantization"]
            # A tensor not compared carries the error that flowed into it, so the next
            # compared op is charged only with what it adds.
            error_of[index] = inputs_error
            if tensor["dtype"] not in _QUANTIZED or not quant or len(quant["scale"]) != 1:
                continue
            if index not in owners:
                unmatched.append(tensor["name"])
                continue
            scale, zero = quant["scale"][0], quant["zero_point"][0]
            value = (values[index].astype(np.float32) - zero) * scale
            row = _compare(owners[index], value, reference[owners[index]])
            error_of[index] = row["relative_rmse"]
            row.update(tensor=tensor["name"], op=op["op"], scale=scale, zero_point=zero,
                       rmse_steps=row["rmse"] / scale,
                       added_error=row["relative_rmse"] - inputs_error)
            rows.append(row)
    by_layer = {}
    for row in rows:
        by_layer[row["layer"]] = max(by_layer.get(row["layer"], -np.inf), row["added_error"])
    worst = sorted(by_layer, key=by_layer.get, reverse=True)
    return {"rows": rows, "worst": worst, "unmatched": unmatched, "samples": len(data)}


def _compare(layer, value, ref):
    """Errors of a dequantized TFLite tensor against its Keras layer's float output."""
    rmse = float(np.sqrt(np.mean((value - ref) ** 2)))
    signal = float(np.sqrt(np.mean(ref ** 2)))
    return {"layer": layer, "shape": list(value.shape[1:]), "rmse": rmse,
            "relative_rmse": rmse / signal if signal > 0 else float(rmse > 0),
            "max_abs_error": float(np.max(np.abs(value - ref)))}


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
    if report.get("unmatched"):
        lines += ["", f"Not compared ({len(report['unmatched'])} integer tensors no Keras layer "
                  f"outputs, e.g. a SeparableConv2D's depthwise half): "
                  + ", ".join(f"`{name}`" for name in report["unmatched"])]
    return "\n".join(lines)
