"""TFLite Micro LUT compression of an int8 flatbuffer, and the proof that it changed nothing.

An int8 weight tensor with at most 2^b distinct values (per tensor, or per channel along axis
0 or the last axis) can be stored as b-bit indices plus a value table; TFLite Micro decodes it
at run time with a `TFLM_DECODE` custom op inserted before each consumer. `plan` finds those
tensors and picks, for each, the layout with the fewest bytes; `compress` hands them to
`tflite_micro.compression`; `verify` runs both models in TFLM and requires every output to be
equal, bit for bit. LiteRT has no `TFLM_DECODE` kernel: the compressed file is for TFLM only.

Example:
    >>> from tflite_ext import lut
    >>> small, plan = lut.compress(int8_flatbuffer)
    >>> lut.verify(int8_flatbuffer, small, x_test)["identical"]
    True
"""
import contextlib
import io
import math
import warnings

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tflite_ext import flatbuffer_check
from tflite_ext.errors import ConversionError, InputError

MAX_BITS = 7
# Bytes a DECODE costs besides its data and the copies of the tensor's name: the operator, the
# ancillary and decoded tensors' tables, two buffers and alignment (measured: 180-200 bytes).
# A tensor is compressed only when it saves more than that.
DECODE_OVERHEAD = 200
_DCM_BYTES = 16
_INT8 = schema.TensorType.INT8


def check_bits(bits):
    """`lut` of to_tflite: True (up to 7-bit indices) or a maximum index width 1..7."""
    if bits is True:
        return MAX_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise InputError(f"lut must be True or a maximum index width in bits, 1-{MAX_BITS} "
                         f"(TFLite Micro's LUT). Received: lut={bits!r}")
    return bits


def compression_module():
    """`tflite_micro.compression`, or a one-line InputError naming the installed wheel."""
    try:
        from tflite_micro import compression
    except ImportError:
        version = "not installed"
        with contextlib.suppress(Exception):
            version = _version()
        raise InputError("lut=True needs TFLite Micro's compression tools (tflite_micro."
                         "compression, in tflite-micro wheels from 2025 on): pip install -U "
                         f"tflite-micro. Received: tflite-micro {version}") from None
    return compression


def _bits(count):
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


def _layouts(array, quantized_axis):
    """(bits, axis or None, values per table, bytes) for each layout TFLM decodes correctly.

    A tensor quantized per channel gets tables on its quantized axis only: TFLM 0.dev20261023
    decodes one table for a per-channel-quantized FULLY_CONNECTED weight into wrong outputs
    (found by `verify` on tfmot's clustered digits CNN: 130 steps off on the first image).
    """
    n = array.size
    found = []
    if quantized_axis is None:
        distinct = len(np.unique(array))
        found.append((_bits(distinct), None, distinct, math.ceil(n * _bits(distinct) / 8)
                      + distinct + _DCM_BYTES))
        axes = {0, array.ndim - 1} if array.ndim > 1 else set()
    else:
        axes = {quantized_axis} & {0, array.ndim - 1}
    for axis in sorted(axes):
        per = max(len(np.unique(s)) for s in np.moveaxis(array, axis, 0))
        channels = array.shape[axis]
        found.append((_bits(per), axis, per, math.ceil(n * _bits(per) / 8) + channels * per
                      + _DCM_BYTES))
    return found


def plan(flatbuffer, max_bits=MAX_BITS):
    """The int8 constant tensors worth compressing, each with its cheapest LUT layout.

    Returns a list of dicts: subgraph, tensor (index), name, shape, bits, axis (None: one
    table per tensor), values (largest table), bytes (int8 data), lut_bytes (indices +
    tables + 16-byte header). A tensor is listed when its layout fits `max_bits` and saves
    more than `DECODE_OVERHEAD` bytes.
    """
    model = schema.Model.GetRootAs(flatbuffer, 0)
    chosen = []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        read = {int(i) for o in range(graph.OperatorsLength())
                for i in graph.Operators(o).InputsAsNumpy() if i >= 0}
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            buffer = model.Buffers(tensor.Buffer())
            if tensor.Type() != _INT8 or not buffer.DataLength() or t not in read:
                continue
            shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
            array = buffer.DataAsNumpy().view(np.int8).reshape(shape or [-1])
            q = tensor.Quantization()
            axis = int(q.QuantizedDimension()) if q is not None and q.ScaleLength() > 1 else None
            options = [o for o in _layouts(array, axis) if o[0] <= max_bits]
            if not options:
                continue
            bits, lut_axis, values, size = min(options, key=lambda o: o[3])
            name = (tensor.Name() or b"").decode(errors="replace")
            # The encoded, decoded and ancillary tensors carry its (shortened) name.
            if array.size - size <= DECODE_OVERHEAD + 3 * len(name.split(";")[0]):
                continue
            chosen.append({"subgraph": s, "tensor": t, "name": name, "shape": shape,
                           "bits": bits, "axis": lut_axis, "values": values,
                           "bytes": int(array.size), "lut_bytes": int(size)})
    return chosen


def _has_int8_weights(flatbuffer):
    model = schema.Model.GetRootAs(flatbuffer, 0)
    return any(g.Tensors(t).Type() == _INT8 and model.Buffers(g.Tensors(t).Buffer()).DataLength()
               for g in (model.Subgraphs(s) for s in range(model.SubgraphsLength()))
               for t in range(g.TensorsLength()))


def compress(flatbuffer, max_bits=MAX_BITS):
    """(compressed flatbuffer, plan): every tensor of `plan` LUT-compressed for TFLM.

    Raises:
        InputError: the model has no int8 weights (a float model), no tensor has few enough
            values (cluster the model first), or tflite_micro.compression is missing.
    """
    compression = compression_module()
    flatbuffer = bytes(flatbuffer)
    if not _has_int8_weights(flatbuffer):
        raise InputError("lut=True compresses int8 weights, and this model has none (a float "
                         "model?): convert with mode='int8'. Received: no int8 constant tensors")
    chosen = plan(flatbuffer, max_bits)
    if not chosen:
        raise InputError(
            f"lut=True found no int8 weight tensor with at most 2^{max_bits} distinct values "
            "(per tensor or per channel) that would shrink: cluster the model first "
            "(tflite_ext.clustering.cluster). Received: max index width "
            f"{max_bits} bits")
    renamed = _short_names(flatbuffer, chosen)
    builder = compression.SpecBuilder()
    for entry in chosen:
        mode = (compression.spec.PerTensor() if entry["axis"] is None
                else compression.spec.PerChannel(axis=entry["axis"]))
        builder.add_tensor(entry["subgraph"], entry["tensor"]).with_lut(entry["bits"], mode)
    log = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(log):
        warnings.simplefilter("always")
        try:
            compressed = bytes(compression.compress(renamed, builder.build()))
        except Exception as e:  # the compressor's own one-line reason
            raise ConversionError(f"TFLite Micro's compressor refused the model: "
                                  f"{str(e).splitlines()[0][:300]}") from None
    # A tensor sharing its buffer with an uncompressed one is left as it is (the compressor
    # warns): it is not in the plan the caller sees.
    skipped = " ".join(str(w.message) for w in caught if "Not compressing" in str(w.message))
    chosen = [entry for entry in chosen if f"'{entry['name']}'" not in skipped]
    compressed = _unquantized_encodings(compressed)
    if len(compressed) >= len(flatbuffer):
        raise InputError(f"LUT compression would not shrink this model ({len(flatbuffer):,} -> "
                         f"{len(compressed):,} bytes): cluster it with fewer clusters. "
                         f"Received: {len(chosen)} compressible tensor(s)")
    return compressed, chosen


def _unquantized_encodings(flatbuffer):
    """The model with TFLM_DECODE's inputs (the packed indices and the value tables) carrying
    no quantization. The compressor copies the weight's scales and zero points onto the packed
    tensor; TFLM decodes by the table, and the decoded tensor keeps them: on the digits CNN
    pruned by 3/4, 832 of the LUT file's 13,952 bytes went to copies nothing reads (`verify`
    proves the outputs unchanged)."""
    from tflite_ext import names

    def drop(model):
        decode = {i for i, code in enumerate(model.operatorCodes or [])
                  if code.customCode == b"TFLM_DECODE"}
        for graph in model.subgraphs or []:
            for op in graph.operators or []:
                if op.opcodeIndex in decode:
                    for i in op.inputs if op.inputs is not None else ():
                        if i >= 0:  # -1: an optional input left out
                            graph.tensors[i].quantization = None

    return names.rewrite(flatbuffer, drop)


def _short_names(flatbuffer, chosen):
    """The model with each chosen tensor named by the first of the converter's ';'-joined
    names (the op that made it). The compressor writes the name three times (encoded,
    "_ancillary", "_decoded"); TFLM reads none of them, and on the digits CNN the full
    names cost ~170 bytes a tensor."""
    from tflite_ext import names

    def shorten(model):
        for entry in chosen:
            short = entry["name"].split(";")[0]
            model.subgraphs[entry["subgraph"]].tensors[entry["tensor"]].name = short.encode()
            entry["name"] = short

    return names.rewrite(flatbuffer, shorten)


def _tflm(flatbuffer, alt_memory=0):
    from tflite_micro import runtime

    flatbuffer = flatbuffer_check.check(flatbuffer)  # TFLM itself reads it unchecked
    arena = max(1 << 20, 20 * len(flatbuffer))
    return runtime.Interpreter.from_bytes(flatbuffer, arena_size=arena,
                                          alt_decompression_memory_size=int(alt_memory))


def _inputs(interpreter, x):
    """Quantized samples for each model input, from float samples (array or list)."""
    from tflite_ext.bench import host

    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    out = []
    for k, array in enumerate(arrays):
        detail = interpreter.get_input_details(k)
        array = host._check_samples(np.asarray(array, np.float32), detail)
        q = detail["quantization_parameters"]
        scale = float(q["scales"][0]) if len(q["scales"]) else 0.0
        zero = int(q["zero_points"][0]) if len(q["zero_points"]) else 0
        out.append(host.quantize(array, {"dtype": detail["dtype"], "quantization": (scale,
                                                                                     zero)}))
    return out


def _check_runs(compressed):
    """TFLM runs the compressed model (tried in a child first: a failure there can abort)."""
    from tflite_ext.bench import micro

    missing = micro.unsupported_ops(compressed)
    if missing:
        raise InputError(
            f"This TFLite Micro runtime cannot run the compressed model: no kernel for "
            f"{', '.join(missing)} (TFLM_DECODE is in tflite-micro wheels from 2025 on): pip "
            "install -U tflite-micro, or convert without lut. Received: tflite-micro "
            f"{_version()}")


def _version():
    import tflite_micro

    return getattr(tflite_micro, "__version__", "unknown")


def verify(reference, compressed, x, alt_memory=0):
    """Runs both models in TFLM on every sample; raises ConversionError unless each output
    is bit-identical. Returns {"samples", "identical", "outputs"}."""
    _check_runs(compressed)
    ref, small = _tflm(bytes(reference)), _tflm(bytes(compressed), alt_memory)
    inputs = _inputs(ref, x)
    outputs = len(schema.Model.GetRootAs(bytes(reference), 0).Subgraphs(0).OutputsAsNumpy())
    for i in range(len(inputs[0])):
        for interpreter in (ref, small):
            for k, q in enumerate(inputs):
                interpreter.set_input(q[i:i + 1], k)
            interpreter.invoke()
        for k in range(outputs):
            a, b = np.asarray(ref.get_output(k)), np.asarray(small.get_output(k))
            if not np.array_equal(a, b):
                raise ConversionError(
                    f"LUT-compressed model differs from the int8 model in TFLM on sample {i}, "
                    f"output {k} (largest difference {int(np.abs(a.astype(int) - b).max())} "
                    "steps): not kept. Received: compressed model of "
                    f"{len(compressed):,} bytes")
    return {"samples": len(inputs[0]), "identical": True, "outputs": outputs}
