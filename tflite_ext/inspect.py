"""Reads any `.tflite` through the official generated flatbuffer schema.

No hand-written byte parsing: the schema module generated from TFLite's `schema.fbs` ships in
`ai_edge_litert`, and the `flatbuffers` runtime reads the file through it.

Example:
    >>> from tflite_ext import inspect
    >>> info = inspect.summary("build/demo/model.tflite")
    >>> info["full_integer"], info["op_counts"]["CONV_2D"], info["macs"]
    (True, 3, 5046272)
    >>> print(inspect.render(info))
"""
import collections
import os

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tflite_ext.errors import ModelFileError
from tflite_ext.files import read_model_bytes

_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
_ITEM_BYTES = {"float32": 4, "float16": 2, "float64": 8, "bfloat16": 2, "int32": 4, "int64": 8,
               "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint32": 4,
               "uint64": 8, "complex64": 8, "complex128": 16}


def _load(model):
    """Returns (bytes, label) for a path or bytes, checking the flatbuffer identifier."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        data, label = bytes(model), "<bytes>"
    else:
        data, label = read_model_bytes(model), os.fspath(model)
    # A TFLite flatbuffer starts with a 4-byte root offset and the file identifier "TFL3".
    if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ModelFileError(
            f"Not a TFLite flatbuffer (expected the 'TFL3' identifier at byte 4, found "
            f"{data[4:8]!r}). Received: {label}")
    return data, label


def _builtin_code(op_code):
    # Codes above 127 live in the 32-bit field; old files only fill the 8-bit deprecated one.
    return max(op_code.BuiltinCode(), op_code.DeprecatedBuiltinCode())


def _quantization(tensor):
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    return {
        "scale": [float(s) for s in q.ScaleAsNumpy()],
        "zero_point": [int(z) for z in q.ZeroPointAsNumpy()],
        "axis": int(q.QuantizedDimension()),
    }


def _macs(op_name, op, tensors):
    """Multiply-accumulates of one op, from its output shape and weight shape."""
    ins = [i for i in op.InputsAsNumpy() if i >= 0]
    outs = [i for i in op.OutputsAsNumpy() if i >= 0]
    if not ins or not outs or len(ins) < 2:
        return 0
    out_elems = int(np.prod(tensors[outs[0]]["shape"] or [0]))
    w_shape = tensors[ins[1]]["shape"]
    if op_name == "CONV_2D" and len(w_shape) == 4:
        return out_elems * int(np.prod(w_shape[1:]))  # [Cout, KH, KW, Cin]
    if op_name == "CONV_3D" and len(w_shape) == 5:
        return out_elems * int(np.prod(w_shape[:4]))  # [KD, KH, KW, Cin, Cout], TF's layout
    if op_name == "DEPTHWISE_CONV_2D" and len(w_shape) == 4:
        return out_elems * w_shape[1] * w_shape[2]  # [1, KH, KW, Cout]
    if op_name == "FULLY_CONNECTED" and len(w_shape) == 2:
        return out_elems * w_shape[1]  # [Cout, Cin]
    if op_name == "TRANSPOSE_CONV" and len(ins) >= 3:
        in_elems = int(np.prod(tensors[ins[2]]["shape"] or [0]))
        w = tensors[ins[1]]["shape"]  # [Cout, KH, KW, Cin]; each input feeds KH*KW*Cout outputs
        return in_elems * w[0] * w[1] * w[2] if len(w) == 4 else 0
    if op_name == "BATCH_MATMUL":
        return out_elems * tensors[ins[0]]["shape"][-1]
    return 0


def summary(model):
    """Describes a `.tflite` model given as a path or as bytes.

    Returns a dict: size_bytes, subgraphs, op_counts, operators, tensors, inputs, outputs,
    const_bytes, macs, full_integer, float_tensors, float_ops. Operators and tensors of every
    subgraph are listed (control-flow bodies included), each with its "subgraph" and its
    "index" within it; inputs/outputs are those of subgraph 0, the entry point. A loop body's
    ops and MACs count once (the trip count is only known at run time). Raises
    ModelFileError (one line) for a missing, empty, truncated or corrupt file.
    """
    data, label = _load(model)
    try:
        return _summarize(data)
    except ModelFileError:
        raise
    except Exception as e:  # The flatbuffers runtime reports bad offsets as struct/index errors.
        raise ModelFileError(
            f"Corrupt or truncated TFLite flatbuffer: an offset points outside its "
            f"{len(data):,} bytes ({type(e).__name__}). Received: {label}") from None


def _summarize(data):
    m = schema.Model.GetRootAs(data, 0)
    if m.SubgraphsLength() == 0:
        raise ModelFileError("TFLite flatbuffer has no subgraphs: nothing to run.")
    buffer_bytes = []
    for b in range(m.BuffersLength()):
        buf = m.Buffers(b)
        if buf.DataLength() and buf.DataAsNumpy().size != buf.DataLength():
            raise ModelFileError(f"Truncated TFLite flatbuffer: buffer {b} runs past the end of "
                                 f"the {len(data):,} bytes.")
        # Large models keep weights after the flatbuffer: then Offset/Size say where.
        external = buf.Size() if buf.Offset() > 1 else 0
        if external and buf.Offset() + external > len(data):
            raise ModelFileError(f"Truncated TFLite file: buffer {b} ends at byte "
                                 f"{buf.Offset() + external:,}, the file has {len(data):,}.")
        buffer_bytes.append(buf.DataLength() or external)
    op_names = []
    for c in range(m.OperatorCodesLength()):
        code = m.OperatorCodes(c)
        builtin = _builtin_code(code)
        custom = code.CustomCode()
        op_names.append(custom.decode() if builtin == schema.BuiltinOperator.CUSTOM and custom
                        else _OP_NAMES.get(builtin, f"BUILTIN_{builtin}"))

    # Control flow (WHILE, IF, CALL_ONCE) runs other subgraphs: walk them all, or float ops
    # inside a loop body would pass for full integer. Indices are local to their subgraph.
    tensors, operators = [], []
    for s in range(m.SubgraphsLength()):
        g = m.Subgraphs(s)
        local = [_tensor(g.Tensors(t), t, s, buffer_bytes) for t in range(g.TensorsLength())]
        for o in range(g.OperatorsLength()):
            op = g.Operators(o)
            name = op_names[op.OpcodeIndex()]
            ins = [int(i) for i in op.InputsAsNumpy() if i >= 0] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy() if i >= 0] if op.OutputsLength() else []
            floats = [local[i]["name"] for i in ins + outs if local[i]["dtype"] in FLOAT_TYPES]
            operators.append({"subgraph": s, "index": o, "op": name, "inputs": ins,
                              "outputs": outs, "macs": int(_macs(name, op, local)),
                              "float_tensors": floats})
        tensors += local

    main = m.Subgraphs(0)
    main_tensors = [t for t in tensors if t["subgraph"] == 0]

    def io(indices):
        rows = []
        for i in indices:
            t = main_tensors[i]
            q = t["quantization"] or {"scale": [0.0], "zero_point": [0]}
            rows.append({"name": t["name"], "index": int(i), "dtype": t["dtype"],
                         "shape": t["shape"], "scale": q["scale"][0],
                         "zero_point": q["zero_point"][0]})
        return rows

    float_ops = [_where(_op_label(op), op["subgraph"]) for op in operators if op["float_tensors"]]
    float_tensors = [_where(t["name"], t["subgraph"]) for t in tensors
                     if t["dtype"] in FLOAT_TYPES]
    # Subgraphs may share a constant buffer; the file holds it once.
    const = {t["buffer"]: t["const_bytes"] for t in tensors if t["const_bytes"]}
    return {
        "size_bytes": len(data),
        "subgraphs": m.SubgraphsLength(),
        "op_counts": dict(collections.Counter(op["op"] for op in operators)),
        "operators": operators,
        "tensors": tensors,
        "inputs": io(main.InputsAsNumpy() if main.InputsLength() else []),
        "outputs": io(main.OutputsAsNumpy() if main.OutputsLength() else []),
        "const_bytes": int(sum(const.values())),
        "macs": int(sum(op["macs"] for op in operators)),
        "full_integer": not float_tensors and not float_ops,
        "float_tensors": float_tensors,
        "float_ops": float_ops,
    }


def _tensor(tensor, index, subgraph, buffer_bytes):
    dtype = _TYPE_NAMES.get(tensor.Type(), f"type_{tensor.Type()}")
    buffer = tensor.Buffer()
    const = buffer_bytes[buffer] if 0 < buffer < len(buffer_bytes) else 0
    return {
        "subgraph": subgraph,
        "index": index,
        "name": tensor.Name().decode(errors="replace"),
        "dtype": dtype,
        "shape": [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else [],
        "buffer": int(buffer),
        "const_bytes": int(const),
        "quantization": _quantization(tensor),
    }


def _op_label(op):
    return f"{op['op']}#{op['index']}"


def _where(label, subgraph):
    """Names the subgraph of an op or tensor outside the main one: "ADD#1 in subgraph 2"."""
    return label if subgraph == 0 else f"{label} in subgraph {subgraph}"


def float_leaks(info, allow=()):
    """Float ops and tensors of a summary that were not explicitly allowed, in every subgraph.

    `allow` holds op types (e.g. "DEQUANTIZE") and tensor names the caller accepts in float. A
    float tensor is excused when it is named, or when every op that touches it (in its own
    subgraph) is an allowed type. Leaks outside subgraph 0 name their subgraph:

        >>> inspect.float_leaks(inspect.summary("loop.tflite"), ["WHILE", "x", "Identity"])
        ['MUL#1 in subgraph 2', 'ADD#2 in subgraph 2', ...]
    """
    allowed = set(allow)
    users = collections.defaultdict(set)  # (subgraph, tensor name) -> op types touching it
    for op in info["operators"]:
        for name in op["float_tensors"]:
            users[op["subgraph"], name].add(op["op"])
    ops = [_where(_op_label(op), op["subgraph"]) for op in info["operators"]
           if op["float_tensors"] and op["op"] not in allowed
           and not set(op["float_tensors"]) <= allowed]
    tensors = [_where(t["name"], t["subgraph"]) for t in info["tensors"]
               if t["dtype"] in FLOAT_TYPES and t["name"] not in allowed
               and not (users[t["subgraph"], t["name"]]
                        and users[t["subgraph"], t["name"]] <= allowed)]
    return ops + tensors


def render(info, top=12):
    """A human-readable text report of a summary."""
    lines = [f"size: {info['size_bytes']:,} bytes  constant data: {info['const_bytes']:,} bytes  "
             f"MACs: {info['macs']:,}"]
    lines.append("operators: " + ", ".join(
        f"{k} x{v}" for k, v in sorted(info["op_counts"].items(), key=lambda kv: -kv[1])))
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            lines.append(f"{kind[:-1]}: {t['name']} {t['dtype']}{t['shape']} "
                         f"scale={t['scale']:.6g} zero_point={t['zero_point']}")
    dtypes = collections.Counter(t["dtype"] for t in info["tensors"])
    lines.append("tensor dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    biggest = sorted(info["tensors"], key=lambda t: -t["const_bytes"])[:top]
    lines.append("largest constant tensors:")
    lines += [f"  {t['const_bytes']:>10,}  {t['dtype']:<8} {str(t['shape']):<20} {t['name']}"
              for t in biggest if t["const_bytes"]]
    if info["full_integer"]:
        lines.append("full integer: yes")
    else:
        lines.append(f"full integer: no ({len(info['float_tensors'])} float tensors, "
                     f"{len(info['float_ops'])} float ops)")
        lines += [f"  float op: {_where(_op_label(op), op['subgraph'])} "
                  f"({', '.join(op['float_tensors'])})"
                  for op in info["operators"] if op["float_tensors"]]
        lines += [f"  float tensor: {n}" for n in info["float_tensors"]]
    return "\n".join(lines)
