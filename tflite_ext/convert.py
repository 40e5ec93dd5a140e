"""Keras 3 model to a verified TFLite flatbuffer.

The default is full integer: int8 weights and activations, int8 model I/O, no float fallback.
After conversion the flatbuffer is re-opened through the official schema and every float op or
tensor that the caller did not explicitly allow is a `ConversionError` — never a silently
half-float model.

Example:
    >>> import tflite_ext as tx
    >>> result = tx.convert.to_tflite(model, representative_data=x_train[:200])
    >>> result.report["full_integer"], len(result.flatbuffer)
    (True, 277968)
    >>> result.save("build/model.tflite")
"""
import contextlib
import dataclasses
import functools
import os
import re
import tempfile
import warnings
import zipfile

import numpy as np

from tflite_ext import inspect, names, native_log
from tflite_ext.errors import ConversionError, InputError, ModelFileError
from tflite_ext.files import atomic_write, remove_stale_temps, temp_prefix

MODES = ("int8", "int16x8", "float16", "dynamic", "float32")
_IO_DTYPES = {"int8": ("int8", "uint8", "float32"), "int16x8": ("int16", "float32"),
              "float16": ("float32",), "dynamic": ("float32",), "float32": ("float32",)}
_INTEGER_MODES = ("int8", "int16x8")
# Ops that convert between float and integer tensors: allowed at float I/O and around ops the
# caller allowed in float.
_BRIDGE_OPS = ("QUANTIZE", "DEQUANTIZE")


@dataclasses.dataclass
class LutResult:
    """The TFLite Micro LUT-compressed copy of a model (`to_tflite(..., lut=True)`).

    `report`: tensors (what `lut.plan` chose for each), bytes before and after, and
    verification (samples on which TFLM gave bit-identical outputs). LiteRT has no kernel
    for its `TFLM_DECODE` ops: run it with TensorFlow Lite Micro.
    """

    flatbuffer: bytes
    report: dict


@dataclasses.dataclass
class ConversionResult:
    """What `to_tflite` made: the flatbuffer and what verification found in it.

    `report` is `inspect.summary(flatbuffer)` plus `mode`, `io_dtype`, `allowed_float` and
    `float_leaks` (empty for a verified full-integer model). `lut` is the LUT-compressed copy
    (`LutResult`) when asked for.
    """

    flatbuffer: bytes
    report: dict
    lut: LutResult = None

    def save(self, path):
        """Writes the flatbuffer atomically, and the LUT copy beside it (`lut_path(path)`);
        returns the path. Both files appear whole, or neither."""
        if self.lut is None:
            return atomic_write(path, self.flatbuffer)
        second = atomic_write(lut_path(path), self.lut.flatbuffer)
        try:
            return atomic_write(path, self.flatbuffer)
        except BaseException:
            os.unlink(second)
            raise


def lut_path(path):
    """Where the LUT copy of `path` goes: `model.tflite` -> `model.lut.tflite`."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.lut{ext or '.tflite'}"


def to_tflite(model, representative_data=None, *, mode="int8", io_dtype=None,
              allow_float=(), num_calibration_samples=300, batch_size=1, lut=False,
              lut_data=None, strip_names=False, signature=True):
    """Converts a Keras 3 model (object, `.keras` file or SavedModel folder) to TFLite.

    Args:
        model: a `keras.Model` (functional, Sequential, or subclassed and called once), a
            path to a `.keras` file, or a SavedModel directory.
        representative_data: calibration inputs for post-training quantization: a numpy array
            (N, *input_shape); for several inputs a list of arrays in `model.inputs` order or
            a dict {input name: array} (the `keras.Input` names; "input_0", "input_1", ... for
            a subclassed model); a `tf.data.Dataset`, a generator or a callable returning one;
            or a `.npy`/`.npz` path (a `.npz`'s arrays are matched to the inputs by name). Not
            needed for a quantization-aware (fake-quant) model or for float16/dynamic/float32
            modes.
        mode: "int8" (full integer), "int16x8" (int16 activations, int8 weights), "float16",
            "dynamic" (int8 weights, float activations) or "float32".
        io_dtype: model input/output type; "int8" (default), "uint8" or "float32" for int8
            mode; "int16" or "float32" for int16x8; float modes keep "float32".
        allow_float: op types (e.g. "LOG_SOFTMAX") or tensor names that may stay in float.
            Integer modes refuse float fallback unless something is allowed here.
        num_calibration_samples: at most this many samples are used for calibration.
        batch_size: fixed batch dimension of the converted model (1 suits MCUs and phones);
            None keeps it dynamic.
        lut: also make a TensorFlow Lite Micro copy whose int8 tensors with at most 2^b
            distinct values (a clustered model's) are stored as b-bit indices plus value
            tables (`tflite_ext.lut`); True allows 1-7 bit indices, an int caps b. The copy
            is kept only if TFLM gives bit-identical outputs to the int8 model on every
            sample of `lut_data`. LiteRT cannot run it (no `TFLM_DECODE` kernel).
        lut_data: float samples for that proof (default: `representative_data`).
        strip_names: leave out tensor names, signature defs and the description
            (`tflite_ext.names`): TFLM never reads them, and on a small model they are a
            sixth of the file. LiteRT still runs it (not through a signature runner).
        signature: False converts a traced call of the model instead of the SavedModel the
            converter otherwise reads (3.5-7x faster: 0.36 s against 2.5 s for QAT ResNet-8):
            the file has no signature def and its input and output tensors keep the traced
            graph's names; `names.strip` of it is byte for byte `names.strip` of the other.
            For a Keras model in memory with one input and one output. With `strip_names`
            (the names go anyway) such a model is always converted this way.

    Returns:
        A `ConversionResult` (with `.lut` when `lut` is set).

    Example:
        >>> result = to_tflite(strip_clustering(clustered), lut=True, lut_data=x_test)
        >>> len(result.lut.flatbuffer) / len(result.flatbuffer)
        0.56
        >>> result.save("digits.tflite")          # and digits.lut.tflite
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}. Received: mode={mode!r}")
    io_dtype = io_dtype or _IO_DTYPES[mode][0]
    if io_dtype not in _IO_DTYPES[mode]:
        raise InputError(f"io_dtype for mode={mode} must be one of "
                         f"{', '.join(_IO_DTYPES[mode])}. Received: io_dtype={io_dtype!r}")
    allow_float = tuple(allow_float)
    if lut:  # checked before converting: a bad request costs no conversion
        max_bits = _check_lut(lut, mode, lut_data if lut_data is not None
                              else representative_data)
    if isinstance(num_calibration_samples, bool) or not isinstance(num_calibration_samples, int) \
            or num_calibration_samples < 1:
        raise InputError(f"num_calibration_samples must be an integer >= 1. Received: "
                         f"num_calibration_samples={num_calibration_samples!r}")

    traced = _traceable(model)
    if not signature and not traced:
        raise InputError(f"signature=False converts a traced call: it needs a Keras model in "
                         f"memory with one input and one output. Received: "
                         f"model={_describe(model)}")
    traced = traced and (strip_names or not signature)
    # The converter reads other Keras models from a SavedModel written here; a SIGKILL leaves
    # it (.tmp-tflite_ext-<pid>-savedmodel), so the next conversion removes dead processes' ones.
    remove_stale_temps(tempfile.gettempdir())
    with (contextlib.nullcontext() if traced else
          tempfile.TemporaryDirectory(prefix=temp_prefix(), suffix="-savedmodel")) as workdir:
        flatbuffer = _convert(model, representative_data, mode, io_dtype, allow_float,
                              num_calibration_samples, batch_size, workdir)

    report = inspect.summary(flatbuffer)
    allowed = list(allow_float)
    if allow_float or io_dtype == "float32":
        allowed += list(_BRIDGE_OPS)  # the float islands need their (de)quantize bridges
    if io_dtype == "float32":
        allowed += [t["name"] for t in report["inputs"] + report["outputs"]]
    leaks = inspect.float_leaks(report, allowed) if mode in _INTEGER_MODES else []
    report.update(mode=mode, io_dtype=io_dtype, allowed_float=list(allow_float),
                  float_leaks=leaks)
    if leaks and representative_data is None and not _has_integer_activations(report):
        raise _needs_calibration(mode)  # nothing was quantized: no ranges to quantize with
    if leaks:
        culprits = sorted({op["op"] for op in report["operators"] if op["float_tensors"]
                           and op["op"] not in _BRIDGE_OPS and op["op"] not in allowed})
        raise ConversionError(
            f"mode={mode} cannot be full integer: op(s) {', '.join(culprits) or leaks[0]} stay "
            f"float ({len(leaks)} float op(s)/tensor(s) in all). Pass "
            f"allow_float={culprits!r} to accept them, or replace them in the model.")
    result = ConversionResult(flatbuffer, report)
    if lut:
        result.lut = _lut_copy(flatbuffer, max_bits, lut_data if lut_data is not None
                               else representative_data, strip_names)
    if strip_names:
        result.flatbuffer = names.strip(flatbuffer)
        report.update(inspect.summary(result.flatbuffer))  # mode, leaks etc. stay
    return result


def _check_lut(lut, mode, data):
    from tflite_ext import lut as lut_lib

    max_bits = lut_lib.check_bits(lut)
    if mode != "int8":
        raise InputError(f"lut=True compresses int8 weights for TFLite Micro: convert with "
                         f"mode='int8'. Received: mode={mode!r}")
    if data is None:
        raise InputError("lut=True proves the compressed model gives the int8 model's outputs "
                         "on data: pass lut_data= (float samples) or representative_data. "
                         "Received: lut_data=None")
    lut_lib.compression_module()
    return max_bits


def _lut_copy(flatbuffer, max_bits, data, strip_names=False):
    """The verified LUT copy (`tflite_ext.lut`), samples as float arrays."""
    from tflite_ext import lut as lut_lib

    compressed, chosen = lut_lib.compress(flatbuffer, max_bits)
    if strip_names:  # the file proven below is the one written
        compressed = names.strip(compressed)
    if isinstance(data, (str, os.PathLike)):
        data = load_array_file(data)
    if isinstance(data, dict):  # TFLM numbers its inputs; names cannot be matched there
        if len(data) != 1:
            raise InputError("lut_data for a model with several inputs must be a list of "
                             "arrays in the model's input order. Received: a dict with keys "
                             f"{sorted(data)}")
        data = next(iter(data.values()))
    proof = lut_lib.verify(flatbuffer, compressed, data)
    report = {"tensors": chosen, "bytes_before": len(flatbuffer), "bytes": len(compressed),
              "verified": proof,
              "runtime": "TensorFlow Lite Micro only (LiteRT has no TFLM_DECODE kernel)"}
    return LutResult(compressed, report)


def _convert(model, representative_data, mode, io_dtype, allow_float, num_samples, batch_size,
             workdir):
    import tensorflow as tf

    converter, input_specs = _make_converter(model, batch_size, workdir)
    if mode in _INTEGER_MODES or mode == "dynamic" or mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in _INTEGER_MODES:
        fallback = [tf.lite.OpsSet.TFLITE_BUILTINS] if allow_float else []
        if mode == "int16x8":
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                *fallback]
        elif representative_data is not None:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, *fallback]
        else:
            # A quantization-aware model: its fake-quant ops carry every range. TFLITE_BUILTINS_INT8
            # would be refused before the converter looks at the graph (TF checks the options for
            # its metrics without it and demands a representative dataset), and the int16x8 op
            # set breaks int8 softmax; the default op set quantizes what the fake-quant ops say,
            # and the check after conversion refuses any float it left.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.inference_input_type = getattr(tf, io_dtype)
        converter.inference_output_type = getattr(tf, io_dtype)
        if representative_data is not None:
            samples = _calibration_samples(representative_data, input_specs, num_samples)
            if workdir is None:  # a traced call has no signature to match names by: its
                samples = [list(s.values()) for s in samples]  # one input, in a list
            converter.representative_dataset = lambda: iter(samples)

    with native_log.captured() as log, warnings.catch_warnings():
        # The converter's Python warnings (e.g. "Statistics for quantized inputs were expected")
        # describe its internals; what matters is checked on the flatbuffer below.
        warnings.filterwarnings("ignore", module=r"tensorflow\.lite")
        try:
            flatbuffer = converter.convert()
        except Exception as e:
            if representative_data is None and re.search(
                    "representative_dataset|inference_input_type", str(e)):
                raise _needs_calibration(mode) from None
            raise ConversionError(_conversion_message(e, log(), mode)) from None
    return flatbuffer


def _has_integer_activations(report):
    # Quantized tensors that are not constants: the converter did quantize activations (with
    # ranges from a quantization-aware model) rather than only weights.
    return any(t["dtype"] in ("int8", "int16") and t["quantization"] and not t["const_bytes"]
               for t in report["tensors"])


def _needs_calibration(mode):
    # Only a quantization-aware (fake-quant) model carries its own activation ranges.
    return InputError(f"mode={mode} needs representative_data to calibrate activation ranges "
                      f"(or a quantization-aware model). Received: representative_data=None")


def load_model(path):
    """Loads a `.keras` file with the project's custom layers registered."""
    import keras

    path = os.fspath(path)
    if path.endswith(".keras"):
        check_model_path(path)
    _register_custom_objects()
    try:
        return keras.saving.load_model(path)
    except Exception as e:
        raise ModelFileError(f"Cannot load Keras model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). Received: {path!r}") from None


def check_model_path(path):
    """Checks, without TensorFlow, that `path` is a SavedModel folder or a `.keras` file that
    is a complete Keras archive; raises a one-line ModelFileError otherwise.

    Example:
        >>> check_model_path("model.keras")    # before a multi-second TensorFlow import
        'model.keras'
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"Model path does not exist. Received: {path!r}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ModelFileError(f"Folder is not a SavedModel (no saved_model.pb). "
                                 f"Received: {path!r}")
        return path
    if not path.endswith(".keras"):
        hint = " (re-save a .h5 model with model.save('model.keras'))" \
            if path.endswith(".h5") else ""
        raise ModelFileError(f"Expected a .keras file or a SavedModel folder{hint}. "
                             f"Received: {path!r}")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"Model file {path!r} is empty (0 bytes); re-save it with "
                             f"model.save({path!r})")
    problem = _keras_archive_problem(path)
    if problem:
        raise ModelFileError(f"Cannot load Keras model: {path!r} is not a valid .keras file "
                             f"({problem}); re-save it with model.save({path!r})")
    return path


def _keras_archive_problem(path):
    """What is wrong with a .keras zip archive (Keras writes config.json in it), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                return "no config.json in the zip archive"
            bad = archive.testzip()  # CRC of every member: a cut or damaged copy fails here
    except zipfile.BadZipFile as e:
        return f"not a complete zip archive: {e}"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    return f"damaged zip member {bad}" if bad else None


def _register_custom_objects():
    # Importing registers the wrappers with Keras' serialization, so saved models load.
    for module in ("tflite_ext.pruning", "tflite_ext.quantization", "tflite_ext.clustering"):
        with contextlib.suppress(ImportError):
            __import__(module)


def _traceable(model):
    """Whether `to_tflite` can convert a traced call of `model` (`signature=False`): one input
    and one output (with several outputs the trace orders them otherwise than the signature
    does, so stripped files would differ: a dict-output model's did)."""
    import keras

    return isinstance(model, keras.Model) and all(
        len(getattr(model, side, None) or ()) == 1 for side in ("inputs", "outputs"))


def _describe(model):
    if isinstance(model, (str, os.PathLike)):
        return repr(os.fspath(model))
    count = {side: len(getattr(model, side, None) or ()) or "no known"
             for side in ("inputs", "outputs")}
    return (f"{getattr(model, 'name', type(model).__name__)} with {count['inputs']} input(s) "
            f"and {count['outputs']} output(s)")


def _make_converter(model, batch_size, workdir):
    """A TFLiteConverter for a model object or path, and the model's input specs; with no
    `workdir`, of a traced call of the model (`_traceable`)."""
    import keras
    import tensorflow as tf

    if isinstance(model, (str, os.PathLike)):
        path = check_model_path(model)
        if os.path.isdir(path):
            return _saved_model_converter(path, batch_size)
        model = load_model(path)
    if not isinstance(model, keras.Model):
        raise InputError(f"Expected a keras.Model or a model path. Received: "
                         f"{type(model).__name__}")
    specs, signature = _input_specs(model, batch_size)
    call = functools.partial(model.__call__, training=False)
    try:
        with native_log.captured():
            if workdir is None:
                # Given no trackable object, the converter freezes the variables the trace
                # captured into constants (given the model, it keeps READ_VARIABLE ops that
                # nothing initializes). No signature: the SavedModel is what defines one.
                traced = tf.function(call, input_signature=[signature])
                return (tf.lite.TFLiteConverter.from_concrete_functions(
                    [traced.get_concrete_function()]), specs)
            # Else through a SavedModel written by Keras' own ExportArchive with an
            # inference-mode endpoint, which gives the file its serving signature.
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serve", call, [signature])
            archive.write_out(workdir, verbose=False)
    except Exception as e:  # tracing runs the model's own call code
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"Keras cannot trace model {model.name!r} on inputs of shape "
                         f"{[tuple(s.shape) for s in specs]} ({type(e).__name__}: {first}). "
                         f"Received: model={model.name}") from None
    return tf.lite.TFLiteConverter.from_saved_model(workdir), specs


def _input_specs(model, batch_size):
    """(one TensorSpec per input, named as the converted model's signature names it; the
    signature the model is called with)."""
    import keras
    import tensorflow as tf

    tensors = getattr(model, "inputs", None)  # a subclassed or unbuilt model has none
    if tensors:
        if isinstance(model, keras.Sequential):  # its InputLayer is only in a functional view
            model = keras.Model(model.inputs, model.outputs)
        # Users know an input by its keras.Input name; in memory the tensor itself has a
        # generated one ("keras_tensor_3").
        names = {id(layer.output): layer.name for layer in model.layers
                 if isinstance(layer, keras.layers.InputLayer)}
        specs = [tf.TensorSpec([batch_size, *t.shape[1:]], t.dtype, name=names.get(id(t), t.name))
                 for t in tensors]
        return specs, specs[0] if len(specs) == 1 else specs
    # A subclassed model: the input shape(s) Keras recorded when it was first called.
    shape = (model.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise InputError(f"Model {model.name!r} was never called, so its input shape is "
                         f"unknown: call it once on a batch, model(x), or build it on a "
                         f"keras.Input, before converting. Received: model={model.name}")
    several = bool(shape) and isinstance(shape[0], (list, tuple))
    shapes = shape if several else [shape]
    specs = [tf.TensorSpec([batch_size, *s[1:]], model.input_dtype,
                           name=f"input_{k}" if several else "input")
             for k, s in enumerate(shapes)]
    return specs, specs if several else specs[0]


def _saved_model_converter(path, batch_size):
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelFileError(f"Cannot load SavedModel ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). Received: {path!r}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelFileError(f"SavedModel has no 'serving_default' signature. Received: {path!r}")
    specs = [tf.TensorSpec([batch_size, *s.shape[1:]], s.dtype, name=name)
             for name, s in sorted(signature.structured_input_signature[1].items())]
    return tf.lite.TFLiteConverter.from_saved_model(path), specs


def _calibration_samples(data, specs, limit):
    """Checks representative data against the model inputs; returns batch-1 samples, each a
    dict {input name: array}: the converter matches those to its inputs by name, whatever
    order it gives them (not the model's)."""
    out = []
    for array, spec in zip(_as_input_arrays(data, specs, limit), specs):
        array = np.asarray(array)
        expected = tuple(spec.shape[1:])  # None where the model takes any size
        if array.ndim == len(expected):  # one sample given without a batch axis
            array = array[None]
        if array.ndim != len(expected) + 1 or any(
                e is not None and a != e for a, e in zip(array.shape[1:], expected)):
            raise InputError(f"representative_data shape {tuple(array.shape)} does not match "
                             f"model input {spec.name!r} shape "
                             f"(N, {', '.join(map(str, expected))}).")
        if spec.dtype.is_floating and not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"representative_data dtype must be floating for float input "
                             f"{spec.name!r}. Received: dtype={array.dtype}")
        if array.shape[0] == 0:
            raise InputError("representative_data is empty. Received: 0 samples")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = ~np.isfinite(array)
            raise InputError(f"representative_data has {int(bad.sum())} NaN/inf value(s) (first "
                             f"at sample {int(np.argwhere(bad)[0][0])}); calibration needs "
                             f"finite inputs.")
        out.append(array[:limit].astype(spec.dtype.as_numpy_dtype))
    n = min(a.shape[0] for a in out)
    return [{spec.name: a[i:i + 1] for spec, a in zip(specs, out)} for i in range(n)]


def _as_input_arrays(data, specs, limit):
    """Normalizes arrays, dicts, paths, datasets and generators to one array per model input,
    in `specs` order."""
    if isinstance(data, (str, os.PathLike)):
        data = load_array_file(data)
    if isinstance(data, dict):
        return _by_name(data, specs)
    if isinstance(data, np.ndarray):
        _check_count(1, len(specs))
        return [data]
    if isinstance(data, (list, tuple)) and all(isinstance(a, np.ndarray) for a in data):
        if len(specs) > 1 or len(data) == 1:
            _check_count(len(data), len(specs))
            return list(data)
    if callable(data):
        data = data()
    # Anything else is iterated: a tf.data.Dataset, a generator, a list of samples. An element
    # is x, [x] (TFLite's representative_dataset convention), (x, y), one array per input, or
    # a dict {input name: array}; x may itself be a list or dict of inputs.
    try:
        elements = iter(data)
    except TypeError:
        raise InputError(f"representative_data must be an array, a list or dict of arrays, a "
                         f"tf.data.Dataset, a generator or a .npy/.npz path. Received: "
                         f"{type(data).__name__}") from None
    samples = []
    for element in elements:
        if len(samples) >= limit:
            break
        if isinstance(element, (list, tuple)) and element \
                and isinstance(element[0], (dict, list, tuple)):
            element = element[0]  # (x, y) with several inputs in x
        if isinstance(element, dict):
            element = _by_name(element, specs)
        if not isinstance(element, (list, tuple)):
            element = [element]
        parts = [np.asarray(e) for e in element]
        samples.append(parts[:len(specs)] if len(specs) > 1 else parts[:1])
    if not samples:
        raise InputError("representative_data yielded no samples.")
    _check_count(len(samples[0]), len(specs))
    arrays = []
    for k, spec in enumerate(specs):
        parts = [s[k] if s[k].ndim == len(spec.shape) else s[k][None] for s in samples]
        if len({p.shape[1:] for p in parts}) > 1:
            raise InputError(f"representative_data samples for input {spec.name!r} differ in "
                             f"shape; calibrate with samples of one shape. Received: shapes "
                             f"{sorted({p.shape for p in parts})[:3]}")
        arrays.append(np.concatenate(parts))
    return arrays


def _by_name(arrays, specs):
    """One array per input from {input name: array}; a single array serves a single input."""
    keys, names = sorted(arrays), [spec.name for spec in specs]
    if len(keys) == 1 and len(names) == 1:
        return [arrays[keys[0]]]
    if set(keys) != set(names):
        raise InputError(f"representative_data keys {keys} do not match the model's inputs "
                         f"{names}: give one array per input, keyed by its name. "
                         f"Received: keys={keys}")
    return [arrays[name] for name in names]


def _check_count(given, expected):
    if given != expected:
        raise InputError(f"representative_data has {given} input array(s), the model has "
                         f"{expected} input(s).")


def load_array_file(path):
    """Loads calibration data: the array of a `.npy`, or {name: array} of a `.npz`."""
    path = check_array_file(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: loaded[k] for k in loaded.files}
        return loaded
    except Exception as e:
        raise InputError(f"Cannot read representative data as .npy/.npz ({type(e).__name__}). "
                         f"Received: {path!r}") from None


def check_array_file(path, what="Representative data"):
    """Checks, without reading it all, that `path` is a non-empty .npy or .npz file (by its
    first bytes); raises a one-line InputError naming `what` otherwise.

    Example:
        >>> check_array_file("calib.npy")    # before a multi-second TensorFlow import
        'calib.npy'
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} file not found. Received: {path!r}")
    if os.path.isdir(path):
        raise InputError(f"{what} must be a .npy/.npz file, not a folder. "
                         f"Received: {path!r}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise InputError(f"Cannot read {what.lower()} file ({e.strerror}). "
                         f"Received: {path!r}") from None
    if not head:
        raise InputError(f"{what} file is empty (0 bytes). Received: {path!r}")
    if not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK")):  # .npy, .npz (a zip)
        raise InputError(f"Cannot read {what.lower()} as .npy/.npz (it starts with "
                         f"{head!r}, neither format). Received: {path!r}")
    return path


def op_errors(text):
    """The "'tfl.x' op <reason>" sentences of a converter error, without the MLIR locations
    (`loc(callsite(fused[...]))`) in front of them; each once, in order."""
    found = re.findall(r"'(tfl?\.\w+)' op ([^\n]+)", text)
    return list(dict.fromkeys(f"'{op}' op {reason.strip()[:200]}" for op, reason in found))


def _conversion_message(error, log, mode):
    """The most telling line of a converter failure, as one line."""
    text = f"{error}\n{log}"
    ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)))
    if ops:
        return (f"The TFLite converter has no builtin kernel for TF op(s) {', '.join(ops)}; "
                f"mode={mode} cannot convert them. Replace these ops in the model.")
    reasons = op_errors(text)
    quant = [r for r in reasons if r.startswith("'tfl.") and re.search("quantiz|int8", r, re.I)]
    if quant and mode in _INTEGER_MODES:
        names = sorted({r.split("'")[1][len("tfl."):] for r in quant})
        return (f"mode={mode} cannot be full integer: no integer kernel for op(s) "
                f"{', '.join(names)} ({quant[0]}). Pass allow_float=[...] to keep them in "
                f"float.")
    if reasons:
        return "TFLite conversion failed: " + "; ".join(reasons)
    for line in text.splitlines():
        if "error:" in line.lower() or "Error" in line.split(":")[0]:
            if "loc(" in line:  # the message follows the MLIR location, noise to a user
                line = line.rsplit("): ", 1)[-1]
            return "TFLite conversion failed: " + line.strip()[:300]
    first = str(error).strip().splitlines()
    return f"TFLite conversion failed: {first[0][:300] if first else type(error).__name__}"
