"""Checks a .tflite flatbuffer before LiteRT, XNNPACK or TFLite Micro sees it.

TFLite Micro reads a model without verifying it, and LiteRT verifies the flatbuffer's layout
but not what it says: a tensor index past the end, a zero point of 16777196 on an int8 tensor
or a weight buffer shorter than its shape crash the process natively. `check` reads every
table of the file through the official generated schema with bounds-checked reads, then checks
what the runtimes trust: tensor, buffer, opcode and subgraph indices, buffer sizes, shapes,
quantization parameters and names. One `InvalidModelError` (a `ModelFileError`) names the first
problem.

Example:
    >>> from tflite_ext import flatbuffer_check
    >>> data, label = flatbuffer_check.load("model.tflite")   # or bytes
    >>> flatbuffer_check.check(corrupt_bytes)
    InvalidModelError: Not a valid .tflite: tensor 3 'conv/bias' zero point 16777196 is outside
    int8 [-128, 127]. Re-convert the model (tflite-ext convert) or check the file was copied
    whole. Received: 3,016 bytes
"""
import functools
import importlib.util
import math
import os
import struct
import types

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tflite_ext.errors import InvalidModelError, ModelFileError
from tflite_ext.files import read_model_bytes

SCHEMA_VERSION = 3
_DECODE = b"TFLM_DECODE"  # TFLite Micro's LUT decompression op (tflite_ext.lut)
_LUT, _PER_TENSOR = 0, 15  # its decode type for a LUT, and the axis meaning one table
_FIX = "Re-convert the model (tflite-ext convert) or check the file was copied whole."
_I32, _U32, _U16 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<H")
_T = schema.TensorType
_TYPE_NAMES = {v: k.lower() for k, v in vars(_T).items() if not k.startswith("_")}
# Bits per element of the types with a fixed size (strings, resources, variants have none).
_BITS = {_T.FLOAT32: 32, _T.FLOAT16: 16, _T.INT32: 32, _T.UINT8: 8, _T.INT64: 64, _T.BOOL: 8,
         _T.INT16: 16, _T.COMPLEX64: 64, _T.INT8: 8, _T.FLOAT64: 64, _T.COMPLEX128: 128,
         _T.UINT64: 64, _T.UINT32: 32, _T.UINT16: 16, _T.INT4: 4, _T.BFLOAT16: 16,
         _T.INT2: 2, _T.UINT4: 4, _T.FLOAT8_E4M3FN: 8, _T.FLOAT8_E5M2: 8}
_ZERO_POINT_RANGE = {_T.INT8: (-128, 127), _T.UINT8: (0, 255), _T.INT16: (-32768, 32767),
                     _T.UINT16: (0, 65535), _T.INT4: (-8, 7), _T.UINT4: (0, 15),
                     _T.INT2: (-2, 1), _T.INT32: (-2**31, 2**31 - 1)}
# A flipped exponent bit writes scales outside this, and LiteRT's requantization then crashes
# (a 5.3e-44 output scale: signal 11 in FULLY_CONNECTED). Converters write far smaller ones
# than a trained model's ~1e-7 bias scale: MobileNetV2 with weights=None and its BN folded
# has a bias scale of 7.7e-13, which a bound of 1e-12 refused. Below 1e-30 float32 is near
# its subnormal range (1.2e-38).
MIN_SCALE, MAX_SCALE = 1e-30, 1e30
# A non-constant tensor is allocated at run time: past this, a shape is corrupt, not a model.
MAX_TENSOR_BYTES = 2**31 - 1


class _Corrupt(Exception):
    """A read that would leave the file or break the flatbuffer's alignment."""


def _read(fmt, buf, at, what):
    width = fmt.size
    if at < 0 or at + width > len(buf):
        raise _Corrupt(f"{what} at byte {at:,} points outside the file")
    if at % width:
        raise _Corrupt(f"{what} at byte {at:,} is not {width}-byte aligned")
    return fmt.unpack_from(buf, at)[0]


def _check_table(buf, pos):
    """A table's vtable and inline fields lie inside the buffer (the flatbuffers verifier's
    table-start rules)."""
    soffset = _read(_I32, buf, pos, "a table")
    vtable = pos - soffset
    vsize = _read(_U16, buf, vtable, f"the vtable of the table at byte {pos:,}")
    tsize = _read(_U16, buf, vtable + 2, f"the vtable of the table at byte {pos:,}")
    if vsize < 4 or vsize % 2 or vtable + vsize > len(buf) or tsize < 4 \
            or pos + tsize > len(buf):
        raise _Corrupt(f"the table at byte {pos:,} runs past the end of the file")


class _CheckedTable(flatbuffers.table.Table):
    """flatbuffers' Table with every offset, length and alignment checked before use.

    Python slices and struct reads accept negative offsets and short slices silently; the
    native runtimes would read outside the file instead. Subclassing keeps the generated
    object API's `isinstance(table, Table)` checks working."""

    __slots__ = ()

    def __init__(self, buf, pos):  # noqa: B042 - same signature as flatbuffers' Table
        _check_table(buf, pos)
        self.Bytes, self.Pos = buf, pos

    def Offset(self, vtableOffset):  # the vtable was bounds-checked in __init__
        vtable = self.Pos - _I32.unpack_from(self.Bytes, self.Pos)[0]
        if vtableOffset < _U16.unpack_from(self.Bytes, vtable)[0]:
            return _U16.unpack_from(self.Bytes, vtable + vtableOffset)[0]
        return 0

    def Get(self, flags, off):
        width = flags.bytewidth
        if off < 0 or off + width > len(self.Bytes):
            raise _Corrupt(f"a field at byte {off:,} points outside the file")
        if off % width:
            raise _Corrupt(f"a field at byte {off:,} is not {width}-byte aligned")
        return flags.py_type(flags.packer_type.unpack_from(self.Bytes, off)[0])

    def Indirect(self, off):
        return off + _read(_U32, self.Bytes, off, "an offset")

    def String(self, off):
        start = off + _read(_U32, self.Bytes, off, "a string offset")
        length = _read(_U32, self.Bytes, start, "a string")
        end = start + 4 + length
        if end >= len(self.Bytes):  # its terminating zero must be inside too
            raise _Corrupt(f"a string of {length:,} bytes at byte {start:,} runs past the end "
                           f"of the file")
        return bytes(self.Bytes[start + 4:end])

    def _vector(self, off):
        off += self.Pos
        start = off + _read(_U32, self.Bytes, off, "a vector offset")
        length = _read(_U32, self.Bytes, start, "a vector")
        if start + 4 + length > len(self.Bytes):
            raise _Corrupt(f"a vector of {length:,} elements at byte {start:,} runs past the "
                           f"end of the file")
        return start + 4, length

    def VectorLen(self, off):
        return self._vector(off)[1]

    def Vector(self, off):
        return self._vector(off)[0]

    def Union(self, t2, off):
        off += self.Pos
        pos = off + _read(_U32, self.Bytes, off, "a union offset")
        _check_table(self.Bytes, pos)
        t2.Bytes, t2.Pos = self.Bytes, pos

    def GetVectorAsNumpy(self, flags, off):
        start, length = self._vector(off)
        width = flags.bytewidth
        if start + length * width > len(self.Bytes):
            raise _Corrupt(f"a vector of {length:,} {width}-byte elements at byte {start - 4:,} "
                           f"runs past the end of the file")
        if start % width:
            raise _Corrupt(f"a vector at byte {start - 4:,} is not {width}-byte aligned")
        return np.frombuffer(self.Bytes, flatbuffers.number_types.to_numpy_type(flags),
                             count=length, offset=start)


@functools.lru_cache(maxsize=None)
def _checked_schema():
    """A private copy of the generated schema module whose tables are `_CheckedTable`s.

    The generated code looks `flatbuffers.table.Table` up at call time through its module
    global `flatbuffers`: giving the copy its own `flatbuffers` namespace changes nothing for
    the shared schema module other code uses."""
    spec = importlib.util.spec_from_file_location("tflite_ext._checked_schema", schema.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.flatbuffers = types.SimpleNamespace(
        table=types.SimpleNamespace(Table=_CheckedTable), number_types=flatbuffers.number_types,
        packer=flatbuffers.packer, encode=flatbuffers.encode, util=flatbuffers.util,
        Builder=flatbuffers.Builder)
    return module


def label_of(model):
    """How messages name a model given as a path or as bytes: "m.tflite", "3,016 bytes"."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return f"{len(model):,} bytes"
    return os.fspath(model)


def load(model):
    """Returns (bytes, label) of a checked model given as a path or as bytes."""
    label = label_of(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        if not data:
            raise ModelFileError("Model is empty (0 bytes). Received: model=b''")
    else:
        data = read_model_bytes(model)
    return check(data, label), label


def check(data, label=None):
    """Returns `data` if it is a .tflite the runtimes can read safely; raises one
    InvalidModelError naming the first problem otherwise."""
    data = bytes(data)
    label = label or label_of(data)
    # A TFLite flatbuffer starts with a 4-byte root offset and the file identifier "TFL3".
    if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise InvalidModelError(
            f"Not a TFLite flatbuffer (expected the 'TFL3' identifier at byte 4, found "
            f"{data[4:8]!r}). Received: {label}")
    checked = _checked_schema()
    try:
        root = _read(_U32, data, 0, "the root offset")
        model = checked.ModelT.InitFromObj(checked.Model.GetRootAs(data, 0)) if root else None
        if model is None:
            raise _Corrupt("the root offset is 0")
    except _Corrupt as e:
        raise InvalidModelError(f"Corrupt or truncated .tflite: {e} of {len(data):,} bytes. "
                                f"{_FIX} Received: {label}") from None
    except Exception as e:  # what a bounds-checked read can still trip on: bad enum, overflow
        raise InvalidModelError(f"Corrupt or truncated .tflite: its tables cannot be read "
                                f"({type(e).__name__}: {str(e)[:100]}). {_FIX} "
                                f"Received: {label}") from None
    problem = _first_problem(model, len(data))
    if problem:
        raise InvalidModelError(f"Not a valid .tflite: {problem}. {_FIX} Received: {label}")
    return data


def _text(raw, what):
    """(decoded name, problem or None)."""
    if raw is None:
        return "", None
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return "", f"{what} is not UTF-8 text ({bytes(raw[:24])!r})"


def _first_problem(model, size):
    """The first inconsistency the runtimes would trust, as a phrase, or None."""
    if model.version != SCHEMA_VERSION:
        return f"schema version {model.version}, expected {SCHEMA_VERSION}"
    for problem in (_text(model.description, "the model description")[1],
                    *(_text(c.customCode, f"operator code {i}'s custom name")[1]
                      for i, c in enumerate(model.operatorCodes or []))):
        if problem:
            return problem
    buffers, problem = _buffer_sizes(model, size)
    if problem:
        return problem
    subgraphs = model.subgraphs or []
    if not subgraphs:
        return "it has no subgraphs: nothing to run"
    codes = len(model.operatorCodes or [])
    decode = {i for i, c in enumerate(model.operatorCodes or []) if c.customCode == _DECODE}
    custom = {i for i, c in enumerate(model.operatorCodes or [])
              if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.CUSTOM}
    calls = {}
    for s, graph in enumerate(subgraphs):
        problem = _subgraph_problem(graph, s, buffers, codes, custom, len(subgraphs), calls) \
            or _decode_problem(model, graph, s, decode)
        if problem:
            return problem
    return _call_cycle(calls) or _signature_problem(model, subgraphs) \
        or _metadata_problem(model, len(buffers)) or _large_options_problem(subgraphs, size)


def _large_options_problem(subgraphs, size):
    """Custom options kept after the flatbuffer (as large models do) must be in the file."""
    for s, graph in enumerate(subgraphs):
        for o, op in enumerate(graph.operators or []):
            end = op.largeCustomOptionsOffset + op.largeCustomOptionsSize
            if op.largeCustomOptionsOffset > 1 and end > size:
                return f"operator {o}{f' in subgraph {s}' if s else ''}'s custom options end " \
                       f"at byte {end:,}, past the end of the file ({size:,} bytes; truncated?)"
    return None


def _buffer_sizes(model, size):
    """(bytes of constant data of each buffer, problem or None)."""
    sizes = []
    for b, buffer in enumerate(model.buffers or []):
        # Large models keep weights after the flatbuffer: then offset/size say where.
        if buffer.offset > 1:
            if buffer.offset + buffer.size > size:
                return sizes, (f"buffer {b} ends at byte {buffer.offset + buffer.size:,}, past "
                               f"the end of the file ({size:,} bytes; truncated?)")
            sizes.append(int(buffer.size))
        else:
            sizes.append(0 if buffer.data is None else len(buffer.data))
    return sizes, None


def _subgraph_problem(graph, s, buffers, codes, custom, subgraphs, calls):
    where = f" in subgraph {s}" if s else ""
    tensors = graph.tensors or []
    # A LUT-encoded tensor keeps its weights' per-channel quantization on a byte shape: what
    # only custom ops read (TFLM_DECODE, or one the runtime lacks) is theirs to interpret.
    builtin_readers, custom_readers = set(), set()
    for op in graph.operators or []:
        (custom_readers if op.opcodeIndex in custom else builtin_readers).update(_ints(op.inputs))
    encoded = custom_readers - builtin_readers
    n = len(tensors)
    _, problem = _text(graph.name, f"subgraph {s}'s name")
    if problem:
        return problem
    names, constant = [], set()
    for t, tensor in enumerate(tensors):
        name, problem = _text(tensor.name, f"tensor {t}{where}'s name")
        names.append(name)
        problem = problem or _tensor_problem(tensor, f"tensor {t} '{name}'{where}", buffers,
                                             t in encoded)
        if problem:
            return problem
        if buffers[tensor.buffer]:
            constant.add(t)

    def label(t):
        return f"tensor {t} '{names[t]}'{where}"

    for kind, indices in (("input", graph.inputs), ("output", graph.outputs)):
        for i in _ints(indices):
            if not 0 <= i < n:
                return f"subgraph {s} {kind} {i} is not one of its {n} tensors"
        if kind == "input":
            const = [i for i in _ints(indices) if i in constant]
            if const:
                return f"{label(const[0])} is a subgraph input and a constant"
    inputs = set(_ints(graph.inputs))
    written = {}
    for o, op in enumerate(graph.operators or []):
        if not 0 <= op.opcodeIndex < codes:
            return f"operator {o}{where} has opcode index {op.opcodeIndex}, the model has " \
                   f"{codes} operator codes"
        ins, outs = _ints(op.inputs), _ints(op.outputs)
        for kind, indices, low in (("input", ins, -1), ("output", outs, 0),
                                   ("intermediate", _ints(op.intermediates), -1)):
            bad = [i for i in indices if not low <= i < n]
            if bad:  # -1 marks an optional input that is absent
                return f"operator {o}{where} {kind} {bad[0]} is not one of the {n} tensors"
        for t in outs:
            if t in constant:
                return f"operator {o}{where} writes {label(t)}, a constant"
            if t in ins:
                return f"operator {o}{where} reads and writes {label(t)}"
            if t in inputs:
                return f"operator {o}{where} writes {label(t)}, a subgraph input"
            if t in written:
                return f"{label(t)} is written by operators {written[t]} and {o}{where}"
            written[t] = o
        for options in (op.builtinOptions, op.builtinOptions2):
            for key, value in (vars(options) if options is not None else {}).items():
                if key.endswith("SubgraphIndex"):  # WHILE, IF, CALL_ONCE, StableHLO bodies
                    if not 0 <= value < subgraphs:
                        return f"operator {o}{where} calls subgraph {value}, the model has " \
                               f"{subgraphs}"
                    calls.setdefault(s, set()).add(value)
    return None


def _decode_problem(model, graph, s, decode):
    """TFLM_DECODE ops whose LUT header, value tables or packed indices do not cover the
    tensor they decode: TFLite Micro's decoder reads them unchecked."""
    for o, op in enumerate(graph.operators or []):
        if op.opcodeIndex not in decode:
            continue
        where = f"TFLM_DECODE operator {o}{f' in subgraph {s}' if s else ''}"
        ins, outs = _ints(op.inputs), _ints(op.outputs)
        if not outs or len(ins) != 2 * len(outs) or min(ins + outs) < 0:
            return f"{where} has {len(ins)} inputs for {len(outs)} outputs (2 per output)"
        for (encoded, ancillary), decoded in zip(zip(ins[0::2], ins[1::2]), outs):
            enc, anc = (_data(model, graph.tensors[i]) for i in (encoded, ancillary))
            if len(anc) < 16:
                return f"{where} has {len(anc)} bytes of decode metadata, fewer than 16"
            if anc[0] != _LUT:  # other decode types: the runtime refuses what it lacks
                continue
            out = graph.tensors[decoded]
            shape, bits = _ints(out.shape), int(anc[5]) & 0x07
            axis, stride, width = int(anc[5]) >> 4, int(anc[6]), _BITS.get(out.type, 8) // 8
            elements = math.prod(shape)
            tables = 1 if axis == _PER_TENSOR else (shape[axis] if axis < len(shape) else -1)
            if not bits or tables < 0 or stride == 0 or not elements:
                return f"{where} has a LUT header with {bits}-bit indices, axis {axis} and " \
                       f"{stride} values per table for a tensor of shape {shape}"
            if len(anc) - 16 < tables * stride * width or len(enc) * 8 < elements * bits:
                return f"{where}: {len(enc):,} bytes of {bits}-bit indices and " \
                       f"{len(anc) - 16:,} bytes of tables cannot decode shape {shape}"
            if stride < 1 << bits and elements:
                indices = np.unpackbits(enc)[:elements * bits].reshape(elements, bits) \
                    @ (1 << np.arange(bits - 1, -1, -1))
                if indices.max() >= stride:
                    return f"{where} has index {indices.max()} into tables of {stride} values"
    return None


def _data(model, tensor):
    """A tensor's constant bytes as uint8 (inline ones; none for external buffers)."""
    data = model.buffers[tensor.buffer].data
    return np.zeros(0, np.uint8) if data is None else np.asarray(data, np.uint8)


def _ints(values):
    return [] if values is None else [int(v) for v in values]


def _tensor_problem(tensor, label, buffers, encoded):
    if tensor.type not in _TYPE_NAMES:
        return f"{label} has unknown type {tensor.type}"
    dtype = _TYPE_NAMES[tensor.type]
    shape = _ints(tensor.shape)
    if any(d < 0 for d in shape):
        return f"{label} has shape {shape}: dimensions must be >= 0"
    if not 0 <= tensor.buffer < len(buffers):
        return f"{label} uses buffer {tensor.buffer}, the model has {len(buffers)}"
    elements = math.prod(shape)
    bits = _BITS.get(tensor.type)
    stored = buffers[tensor.buffer]
    if bits is not None:
        needed = (elements * bits + 7) // 8
        # Sparse tensors store only their non-zero values.
        if stored and tensor.sparsity is None and stored != needed:
            return f"{label} has {stored:,} bytes of constant data, its shape {shape} of " \
                   f"{dtype} needs {needed:,}"
        if not stored and needed > MAX_TENSOR_BYTES:
            return f"{label} has shape {shape}: {needed:,} bytes of {dtype}, more than 2 GiB"
    return _quantization_problem(tensor, label, dtype, shape, encoded)


def _quantization_problem(tensor, label, dtype, shape, encoded):
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scales = np.asarray(q.scale, np.float64)
    bad = scales[~((scales >= MIN_SCALE) & (scales <= MAX_SCALE))]
    if bad.size:
        return f"{label} has scale {bad[0]:g}, outside [{MIN_SCALE:g}, {MAX_SCALE:g}]"
    zero_points = _ints(q.zeroPoint)
    if len(zero_points) != len(scales):
        return f"{label} has {len(scales)} scales and {len(zero_points)} zero points"
    low, high = _ZERO_POINT_RANGE.get(tensor.type, (-2**63, 2**63 - 1))
    outside = [z for z in zero_points if not low <= z <= high]
    if outside:
        return f"{label} zero point {outside[0]} is outside {dtype} [{low}, {high}]"
    if len(scales) > 1 and not encoded:
        axis = q.quantizedDimension
        if not 0 <= axis < len(shape) or shape[axis] != len(scales):
            return f"{label} has {len(scales)} per-channel scales on dimension {axis} of " \
                   f"shape {shape}"
    return None


def _call_cycle(calls):
    """A subgraph that (through others) calls itself or the entry subgraph: the runtimes
    would recurse without end."""
    def reach(start):
        seen, todo = set(), list(calls.get(start, ()))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo += calls.get(s, ())
        return seen
    for s in sorted(calls):
        found = reach(s)
        if s in found or 0 in found:
            return f"subgraph {s} calls {'itself' if s in found else 'subgraph 0'} (a cycle)"
    return None


def _signature_problem(model, subgraphs):
    for d, sig in enumerate(model.signatureDefs or []):
        _, problem = _text(sig.signatureKey, f"signature {d}'s key")
        if problem:
            return problem
        if not 0 <= sig.subgraphIndex < len(subgraphs):
            return f"signature {d} names subgraph {sig.subgraphIndex}, the model has " \
                   f"{len(subgraphs)}"
        n = len(subgraphs[sig.subgraphIndex].tensors or [])
        for entry in (sig.inputs or []) + (sig.outputs or []):
            _, problem = _text(entry.name, f"a name of signature {d}")
            if problem:
                return problem
            if not 0 <= entry.tensorIndex < n:
                return f"signature {d} names tensor {entry.tensorIndex}, its subgraph has {n}"
    return None


def _metadata_problem(model, buffers):
    for i in _ints(model.metadataBuffer):
        if not 0 <= i < buffers:
            return f"metadata buffer {i} is not one of the {buffers} buffers"
    for entry in model.metadata or []:
        _, problem = _text(entry.name, "a metadata name")
        if problem:
            return problem
        if not 0 <= entry.buffer < buffers:
            return f"metadata uses buffer {entry.buffer}, the model has {buffers}"
    return None
