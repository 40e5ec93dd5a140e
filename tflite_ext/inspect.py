"""Reads any `.tflite` through the official generated flatbuffer schema.

No hand-written byte parsing: the schema module generated from TFLite's `schema.fbs` ships in
`ai_edge_litert`, and the `flatbuffers` runtime reads the file through it.

Example:
    >>> from tflite_ext import inspect
    >>> info = inspect.summary("build/demo/model.tflite")
    >>> info["full_integer"], info["op_counts"]["CONV_2D"], info["macs"]
    (True, 3, 5046272)
    >>> info["warnings"]       # what slows an int8 runtime, one line each
    ["RELU#1 ('model/relu_b/Relu'): a standalone int8 RELU ...: remove the extra activation"]
    >>> print(inspect.render(info))
"""
import collections

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tflite_ext import flatbuffer_check

_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
_ACTIVATION_NAMES = {v: k for k, v in vars(schema.ActivationFunctionType).items()
                     if not k.startswith("_")}
_ACTIVATIONS = ("RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1")
_INT8 = ("int8", "uint8")
_ITEM_BYTES = {"float32": 4, "float16": 2, "float64": 8, "bfloat16": 2, "int32": 4, "int64": 8,
               "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint32": 4,
               "uint64": 8, "complex64": 8, "complex128": 16}


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


def _macs(op_name, ins, outs, tensors):
    """Multiply-accumulates of one op (its present input and output tensor indices), from
    its output shape and weight shape."""
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
    if op_name == "BATCH_MATMUL" and tensors[ins[0]]["shape"]:
        return out_elems * tensors[ins[0]]["shape"][-1]
    return 0


def summary(model):
    """Describes a `.tflite` model given as a path or as bytes.

    Returns a dict: size_bytes, subgraphs, op_counts, operators, tensors, inputs, outputs,
    const_bytes, macs, full_integer, float_tensors, float_ops, warnings (one line each, naming
    the op or tensor and what to do: standalone int8 activations, QUANTIZE/DEQUANTIZE inside
    the graph, float I/O around an int8 graph). Operators and tensors of every
    subgraph are listed (control-flow bodies included), each with its "subgraph" and its
    "index" within it; inputs/outputs are those of subgraph 0, the entry point. A loop body's
    ops and MACs count once (the trip count is only known at run time). Raises
    ModelFileError (one line) for a missing, empty, truncated or corrupt file.
    """
    data, _ = flatbuffer_check.load(model)  # checked: every offset, index and size is in range
    return _summarize(data)


def _summarize(data):
    m = schema.Model.GetRootAs(data, 0)
    buffer_bytes = []
    for b in range(m.BuffersLength()):
        buf = m.Buffers(b)
        # Large models keep weights after the flatbuffer: then Offset/Size say where.
        buffer_bytes.append(buf.Size() if buf.Offset() > 1 else buf.DataLength())
    op_names = []
    for c in range(m.OperatorCodesLength()):
        code = m.OperatorCodes(c)
        builtin = _builtin_code(code)
        custom = code.CustomCode()
        op_names.append(custom.decode() if builtin == schema.BuiltinOperator.CUSTOM and custom
                        else _OP_NAMES.get(builtin, f"BUILTIN_{builtin}"))

    # Control flow (WHILE, IF, CALL_ONCE) runs other subgraphs: walk them all, or float ops
    # inside a loop body would pass for full integer. Indices are local to their subgraph.
    tensors, operators, boundaries = [], [], {}
    for s in range(m.SubgraphsLength()):
        g = m.Subgraphs(s)
        local = [_tensor(g.Tensors(t), t, s, buffer_bytes) for t in range(g.TensorsLength())]
        boundaries[s] = {int(i) for i in (g.InputsAsNumpy() if g.InputsLength() else [])} | \
            {int(i) for i in (g.OutputsAsNumpy() if g.OutputsLength() else [])}
        for o in range(g.OperatorsLength()):
            op = g.Operators(o)
            name = op_names[op.OpcodeIndex()]
            ins = [int(i) for i in op.InputsAsNumpy() if i >= 0] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy() if i >= 0] if op.OutputsLength() else []
            floats = [local[i]["name"] for i in ins + outs if local[i]["dtype"] in FLOAT_TYPES]
            operators.append({"subgraph": s, "index": o, "op": name, "inputs": ins,
                              "outputs": outs, "macs": int(_macs(name, ins, outs, local)),
                              "fused_activation": _fused_activation(op),
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
    inputs, outputs = (io(main.InputsAsNumpy() if main.InputsLength() else []),
                       io(main.OutputsAsNumpy() if main.OutputsLength() else []))
    compressed = _compressed(m, operators, tensors)
    return {
        "size_bytes": len(data),
        "subgraphs": m.SubgraphsLength(),
        "op_counts": dict(collections.Counter(op["op"] for op in operators)),
        "operators": operators,
        "tensors": tensors,
        "inputs": inputs,
        "outputs": outputs,
        "const_bytes": int(sum(const.values())),
        "macs": int(sum(op["macs"] for op in operators)),
        "full_integer": not float_tensors and not float_ops,
        "float_tensors": float_tensors,
        "float_ops": float_ops,
        "warnings": _float_io(operators, main_tensors, inputs, outputs)
        + _standalone_activations(operators, tensors) + _bridges(operators, tensors, boundaries),
        "compressed": compressed,
    }


DECODE_OP = "TFLM_DECODE"  # TFLite Micro's decompression custom op (tflite_micro.compression)
_LUT = 0                   # decode type 0 of its 16-byte common metadata header
_PER_TENSOR_AXIS = 15


def _compressed(model, operators, tensors):
    """The LUT-compressed tensors TFLM_DECODE ops decode, once each (a tensor read by several
    ops has a DECODE per reader, all on one encoded tensor)."""
    local = {(t["subgraph"], t["index"]): t for t in tensors}
    found = {}
    for op in operators:
        if op["op"] != DECODE_OP:
            continue
        pairs = list(zip(op["inputs"][0::2], op["inputs"][1::2]))
        for (encoded, ancillary), decoded in zip(pairs, op["outputs"]):
            key = (op["subgraph"], encoded)
            if key in found:
                found[key]["decode_ops"] += 1
                continue
            enc, anc, out = (local[op["subgraph"], i] for i in (encoded, ancillary, decoded))
            entry = _lut_entry(_buffer(model, enc), _buffer(model, anc), out)
            entry.update(subgraph=op["subgraph"], encoded=encoded, decoded=decoded,
                         decode_ops=1)
            found[key] = entry
    return list(found.values())


def _buffer(model, tensor):
    buf = model.Buffers(tensor["buffer"])
    return buf.DataAsNumpy().tobytes() if buf.DataLength() else b""


def _lut_entry(encoded, ancillary, out):
    """What a LUT-compressed tensor costs: bits, tables, bits per weight, index entropy."""
    name = out["name"][:-len("_decoded")] if out["name"].endswith("_decoded") else out["name"]
    elements = int(np.prod(out["shape"])) if out["shape"] else 1
    entry = {"name": name, "shape": out["shape"], "dtype": out["dtype"],
             "elements": elements, "encoded_bytes": len(encoded),
             "ancillary_bytes": len(ancillary)}
    if len(ancillary) < 16 or ancillary[0] != _LUT:
        entry["method"] = f"decode type {ancillary[0] if ancillary else '?'}"
        return entry
    bits, axis, stride = ancillary[5] & 0x07, ancillary[5] >> 4, ancillary[6]
    indices = np.unpackbits(np.frombuffer(encoded, np.uint8))[:elements * bits]
    indices = indices.reshape(elements, bits) @ (1 << np.arange(bits - 1, -1, -1))
    counts = np.bincount(indices)
    p = counts[counts > 0] / elements
    entropy = float(-(p * np.log2(p)).sum())
    total = len(encoded) + len(ancillary)
    entry.update(method="lut", bits=int(bits), axis=None if axis == _PER_TENSOR_AXIS else int(axis),
                 table_values=int(stride), tables=(len(ancillary) - 16) // max(stride, 1),
                 bits_per_weight=8.0 * total / elements, index_entropy_bits=entropy,
                 # An estimate only: Huffman-coded indices at the entropy, same tables. No
                 # TFLM runtime decodes Huffman yet.
                 huffman_estimate_bytes=int(np.ceil(elements * entropy / 8)) + len(ancillary))
    return entry


def _tensor(tensor, index, subgraph, buffer_bytes):
    dtype = _TYPE_NAMES.get(tensor.Type(), f"type_{tensor.Type()}")
    buffer = tensor.Buffer()
    const = buffer_bytes[buffer] if 0 < buffer < len(buffer_bytes) else 0
    return {
        "subgraph": subgraph,
        "index": index,
        "name": (tensor.Name() or b"").decode(errors="replace"),  # None: names.strip
        "dtype": dtype,
        "shape": [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else [],
        "buffer": int(buffer),
        "const_bytes": int(const),
        "quantization": _quantization(tensor),
    }


def _fused_activation(op):
    """The activation an op applies to its own output ("RELU", "NONE"), or None when its
    options have no such field (RESHAPE, MEAN, ...)."""
    options = schema.BuiltinOptionsCreator(op.BuiltinOptionsType(), op.BuiltinOptions())
    code = getattr(options, "fusedActivationFunction", None)
    return None if code is None else _ACTIVATION_NAMES.get(code, f"ACTIVATION_{code}")


def _graph(operators, tensors, subgraph):
    """(ops, tensors by index, producer of each tensor, readers of each tensor) of a subgraph."""
    ops = [op for op in operators if op["subgraph"] == subgraph]
    local = {t["index"]: t for t in tensors if t["subgraph"] == subgraph}
    producer = {i: op for op in ops for i in op["outputs"]}
    readers = collections.defaultdict(list)
    for op in ops:
        for i in op["inputs"]:
            readers[i].append(op)
    return ops, local, producer, readers


def _float_io(operators, tensors, inputs, outputs):
    """Float model inputs/outputs that only (de)quantize into an int8 graph: io_dtype='int8'
    removes a conversion per call, and MCUs and NPUs need integer I/O anyway."""
    _, local, producer, readers = _graph(operators, tensors, 0)
    found = []
    for t in inputs:
        ops = readers[t["index"]]
        if t["dtype"] in FLOAT_TYPES and ops and all(
                op["op"] == "QUANTIZE" and op["outputs"]
                and local[op["outputs"][0]]["dtype"] in _INT8 for op in ops):
            q = local[ops[0]["outputs"][0]]["quantization"]
            found.append(f"input '{t['name']}' is {t['dtype']} and "
                         f"{', '.join(map(_op_label, ops))} turns it into "
                         f"{local[ops[0]['outputs'][0]]['dtype']} on every call: convert with "
                         f"io_dtype='int8' and feed int8 (scale={q['scale'][0]:.6g}, "
                         f"zero_point={q['zero_point'][0]})")
    for t in outputs:
        op = producer.get(t["index"])
        if t["dtype"] in FLOAT_TYPES and op and op["op"] == "DEQUANTIZE" and op["inputs"] \
                and local[op["inputs"][0]]["dtype"] in _INT8:
            q = local[op["inputs"][0]]["quantization"]
            zero = q["zero_point"][0]
            found.append(f"output '{t['name']}' is {t['dtype']}, made from int8 by "
                         f"{_op_label(op)} on every call: convert with io_dtype='int8' and "
                         f"dequantize on the host ((q {'-' if zero >= 0 else '+'} {abs(zero)}) "
                         f"* {q['scale'][0]:.6g})")
    return found


def _standalone_activations(operators, tensors):
    """int8 RELU-family ops left as ops of their own. XNNPACK does not delegate them (an int8
    RELU or RELU6 leaves two delegate partitions where the fused model has one), so each one
    splits the int8 partition: 88 µs against 29 µs on a pruned QAT ResNet-8."""
    found = []
    for s in sorted({op["subgraph"] for op in operators}):
        ops, local, producer, readers = _graph(operators, tensors, s)
        for op in ops:
            if op["op"] not in _ACTIVATIONS or not op["inputs"] or not op["outputs"] \
                    or local[op["inputs"][0]]["dtype"] not in _INT8:
                continue
            source = producer.get(op["inputs"][0])
            others = [o for o in readers[op["inputs"][0]] if o is not op]
            if source is None:
                why = ("it reads a graph input: apply it in whatever makes that input, or drop "
                       "it")
            elif source["op"] in _ACTIVATIONS or source["fused_activation"] not in (None, "NONE"):
                applied = source["op"] if source["op"] in _ACTIVATIONS else \
                    source["fused_activation"]
                # RELU after any clamp at 0 changes nothing; RELU6 after RELU is one RELU6.
                redundant = op["op"] == applied or (
                    op["op"] == "RELU" and applied in ("RELU6", "RELU_0_TO_1"))
                why = (f"it repeats the {applied} that {_op_label(source)} already applies: "
                       f"remove the extra activation layer" if redundant else
                       f"it follows the {applied} that {_op_label(source)} already applies: "
                       f"give that layer the one activation both amount to, and remove this one")
            elif others:
                why = (f"{_op_label(source)}'s output is also read by "
                       f"{', '.join(map(_op_label, others))}, so the converter cannot fuse it: "
                       f"feed them the activated tensor if the model allows")
            elif source["fused_activation"] == "NONE":
                why = (f"the converter did not fuse it into {_op_label(source)}: put the "
                       f"activation right after that layer (e.g. its activation= argument)")
            else:
                why = (f"{_op_label(source)} cannot fuse an activation: apply it in the layer "
                       f"before {_op_label(source)} (its activation= argument) if the model "
                       f"allows")
            found.append(f"{_where(_op_label(op), s)} ('{local[op['outputs'][0]]['name']}'): "
                         f"standalone int8 {op['op']}, which splits the XNNPACK int8 partition; "
                         f"{why}")
    return found


def _bridges(operators, tensors, boundaries):
    """DEQUANTIZE/QUANTIZE inside a graph (not at its I/O): each float island between them
    costs two conversions and a float kernel per call (XNNPACK keeps it in its partition, so
    this is the cost; an integer-only target cannot run it at all)."""
    found = []
    for s in sorted({op["subgraph"] for op in operators}):
        ops, local, producer, readers = _graph(operators, tensors, s)
        closed = set()  # indices of the QUANTIZE ops that end an island already reported
        for op in ops:
            source = local[op["inputs"][0]] if op["inputs"] else None
            # A DEQUANTIZE making a float graph output is float I/O (see _float_io); one
            # reading an int8 graph input starts a float island like any other.
            if op["op"] != "DEQUANTIZE" or source is None or source["const_bytes"] \
                    or source["dtype"] in FLOAT_TYPES or set(op["outputs"]) & boundaries[s]:
                continue
            floats, ends = _island(op, local, readers)
            closed.update(q["index"] for q in ends)
            span = _where(" ... ".join(_op_label(o) for o in [op, *ends]), s)
            if not floats:
                found.append(f"{span} inside the graph: '{source['name']}' goes to float and "
                             f"straight back to int8 for nothing: give the layers on either side "
                             f"one quantization range")
                continue
            named = ", ".join(f"{_op_label(o)} ('{local[o['outputs'][0]]['name']}')"
                              if o["outputs"] else _op_label(o) for o in floats)
            found.append(f"{span} inside the graph: {named} "
                         f"{'runs' if len(floats) == 1 else 'run'} in float "
                         f"{'between them' if ends else 'up to the output'} (int8 to float and "
                         f"back on every call): replace the layer(s) behind "
                         f"{', '.join(sorted({o['op'] for o in floats}))} with ones that have "
                         f"int8 kernels")
        for op in ops:
            source = local[op["inputs"][0]] if op["inputs"] else None
            if op["op"] != "QUANTIZE" or op["index"] in closed or source is None \
                    or source["dtype"] not in FLOAT_TYPES or source["const_bytes"] \
                    or source["index"] in boundaries[s]:
                continue
            before = producer.get(source["index"])
            found.append(f"{_where(_op_label(op), s)} inside the graph quantizes float "
                         f"'{source['name']}'{' from ' + _op_label(before) if before else ''}: "
                         f"replace the float layer(s) before it with ones that have int8 kernels")
    return found


def _island(dequantize, local, readers):
    """(float ops, QUANTIZE ops ending it) of the float island a DEQUANTIZE starts."""
    floats, ends, todo = [], [], list(dequantize["outputs"])
    while todo:
        for reader in readers[todo.pop()]:
            if reader["op"] == "QUANTIZE":
                ends += [reader] if reader not in ends else []
            elif reader not in floats:
                floats.append(reader)
                todo += [i for i in reader["outputs"] if local[i]["dtype"] in FLOAT_TYPES]
    return sorted(floats, key=lambda o: o["index"]), sorted(ends, key=lambda o: o["index"])


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
    lines += render_compressed(info)
    warnings = info.get("warnings", [])
    lines.append(f"warnings: {len(warnings) or 'none'}")
    lines += [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)


def render_compressed(info):
    """Report lines for the TFLM LUT-compressed tensors of a summary (none: no lines)."""
    found = info.get("compressed") or []
    if not found:
        return []
    lines = [f"TFLite Micro LUT-compressed tensors: {len(found)} ({DECODE_OP} ops decode them "
             "at run time; LiteRT has no kernel for them: run this file with TFLM)"]
    for t in found:
        if t.get("method") != "lut":
            lines.append(f"  {t['name']}: {t['method']}, not read")
            continue
        layout = ("per tensor, 1 table" if t["axis"] is None else
                  f"per channel on axis {t['axis']}, {t['tables']} tables")
        lines.append(
            f"  {t['bits']}-bit {layout} of {t['table_values']} values: {t['elements']:,} "
            f"weights in {t['encoded_bytes'] + t['ancillary_bytes']:,} bytes "
            f"({t['bits_per_weight']:.2f} bits/weight) {t['name']}")
        lines.append(
            f"    index entropy {t['index_entropy_bits']:.2f} bits: a Huffman stage could reach "
            f"~{t['huffman_estimate_bytes']:,} bytes (estimate; no TFLM runtime decodes it)")
    return lines
