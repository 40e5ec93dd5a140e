"""Host benchmarks through LiteRT (`ai_edge_litert`): latency, thread sweep, XNNPACK, accuracy.

Example:
    >>> from tflite_ext.bench import host
    >>> host.time_model("build/digits_int8.tflite", runs=100)["median_us"]
    142.0
    >>> host.evaluate("build/digits_int8.tflite", split.x_test, split.y_test)["accuracy"]
    0.9963
"""
import itertools
import time

import numpy as np
from ai_edge_litert import interpreter as litert

from tflite_ext.errors import InputError, ModelFileError
from tflite_ext.files import read_model_bytes


def model_bytes(model):
    """Returns flatbuffer bytes from bytes or a path (checked: exists, non-empty)."""
    if isinstance(model, (bytes, bytearray)):
        if not model:
            raise ModelFileError("Model is empty (0 bytes). Received: model=b''")
        return bytes(model)
    return read_model_bytes(model)


def load_interpreter(model, num_threads=1, xnnpack=True):
    """Returns an allocated LiteRT interpreter for bytes or a path.

    `xnnpack=False` selects the builtin op resolver without default delegates, which is how
    LiteRT turns XNNPACK off.
    """
    if int(num_threads) < 1:
        raise InputError(f"num_threads must be >= 1. Received: num_threads={num_threads}")
    resolver = (litert.OpResolverType.AUTO if xnnpack
                else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    data = model_bytes(model)
    try:
        interp = litert.Interpreter(model_content=data, num_threads=int(num_threads),
                                    experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"LiteRT cannot load the model ({first}). "
                             f"Received: {len(data)} bytes") from None
    return interp


def quantize(x, detail):
    """Maps float inputs to the tensor's dtype with its own scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return np.asarray(x, dtype)
    scale, zero_point = detail["quantization"]
    if not scale:
        return np.asarray(x).astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(y, detail):
    """Maps a quantized output back to float with the tensor's own scale and zero point."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or not scale:
        return np.asarray(y, np.float32)
    return (np.asarray(y, np.float32) - zero_point) * scale


def _check_samples(x, detail):
    x = np.asarray(x)
    shape = tuple(detail["shape"][1:])
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InputError(f"Samples must have shape (N, {', '.join(map(str, shape))}) to match "
                         f"the model input. Received: shape={tuple(x.shape)}")
    if len(x) == 0:
        raise InputError("Need at least one sample. Received: 0 samples")
    return x


def _sample_inputs(detail, count=8, seed=0):
    """Random inputs covering the input tensor's range (for timing only)."""
    rng = np.random.default_rng(seed)
    shape = (count, *detail["shape"][1:])
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dtype)


def _prepared_inputs(interp, x):
    detail = interp.get_input_details()[0]
    if x is None:
        return _sample_inputs(detail)
    return quantize(_check_samples(x, detail), detail)


def _invoke_us(interp, index, sample):
    interp.set_tensor(index, sample[None])
    start = time.perf_counter_ns()
    interp.invoke()
    return (time.perf_counter_ns() - start) / 1000.0


def latency_stats(times_us):
    """min / median / p90 / max / mean of a list of microsecond timings."""
    t = np.asarray(times_us, np.float64)
    return {"min_us": float(t.min()), "median_us": float(np.median(t)),
            "p90_us": float(np.percentile(t, 90)), "max_us": float(t.max()),
            "mean_us": float(t.mean()), "runs": int(t.size)}


def time_model(model, *, runs=50, warmup=5, num_threads=1, xnnpack=True, x=None):
    """Times `runs` single-sample invocations after `warmup` untimed ones.

    Args:
        model: .tflite bytes or path.
        runs, warmup: timed and untimed invocation counts.
        num_threads: LiteRT CPU threads.
        xnnpack: False disables LiteRT's default XNNPACK delegate.
        x: optional float samples (N, ...) cycled through; random inputs otherwise.

    Returns:
        dict with min_us, median_us, p90_us, max_us, mean_us, runs, warmup, num_threads, xnnpack.
    """
    if int(runs) < 1 or int(warmup) < 0:
        raise InputError(f"runs must be >= 1 and warmup >= 0. Received: runs={runs}, "
                         f"warmup={warmup}")
    interp = load_interpreter(model, num_threads, xnnpack)
    samples = _prepared_inputs(interp, x)
    index = interp.get_input_details()[0]["index"]
    for i in range(int(warmup)):
        _invoke_us(interp, index, samples[i % len(samples)])
    times = [_invoke_us(interp, index, samples[i % len(samples)]) for i in range(int(runs))]
    return {**latency_stats(times), "warmup": int(warmup), "num_threads": int(num_threads),
            "xnnpack": bool(xnnpack)}


def thread_sweep(model, threads=(1, 2, 4), xnnpack=(True, False), *, runs=50, warmup=5, x=None):
    """`time_model` for every (threads, xnnpack) pair; returns a list of result dicts."""
    return [time_model(model, runs=runs, warmup=warmup, num_threads=t, xnnpack=xn, x=x)
            for t, xn in itertools.product(threads, xnnpack)]


def predict(model, x, num_threads=1):
    """Float outputs (dequantized with the model's own parameters) for float samples x."""
    interp = load_interpreter(model, num_threads)
    in_detail, out_detail = interp.get_input_details()[0], interp.get_output_details()[0]
    q = quantize(_check_samples(x, in_detail), in_detail)
    outputs = []
    for sample in q:
        interp.set_tensor(in_detail["index"], sample[None])
        interp.invoke()
        outputs.append(interp.get_tensor(out_detail["index"])[0])
    return dequantize(np.stack(outputs), out_detail)


def evaluate(model, x, y, num_threads=1):
    """Top-1 accuracy of a classifier .tflite on float samples x and integer labels y.

    Inputs are quantized and outputs dequantized with the model's own scale/zero point, so
    float, int8 and uint8 I/O models are measured the same way.
    """
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise InputError(f"x and y must have the same length. Received: len(x)={len(x)}, "
                         f"len(y)={len(y)}")
    logits = predict(model, x, num_threads)
    predictions = logits.reshape(len(y), -1).argmax(axis=1)
    return {"accuracy": float(np.mean(predictions == y)), "samples": int(len(y))}


def time_interleaved(models, x=None, runs=200, warmup=10, num_threads=1):
    """Median per-sample latency (µs) of several variants timed round-robin in one process.

    Interleaving spreads clock-speed drift and background load evenly over the variants, so
    their medians are comparable. The order within each round rotates to avoid position bias.

    Args:
        models: {name: .tflite bytes or path}.
        x: optional float samples cycled through (quantized per model); random otherwise.

    Returns:
        {name: median_us}.
    """
    if not models:
        raise InputError("Need at least one model to time. Received: models={}")
    names = list(models)
    interps = {n: load_interpreter(models[n], num_threads) for n in names}
    samples = {n: _prepared_inputs(interps[n], x) for n in names}
    index = {n: interps[n].get_input_details()[0]["index"] for n in names}
    for n in names:
        for i in range(int(warmup)):
            _invoke_us(interps[n], index[n], samples[n][i % len(samples[n])])
    times = {n: [] for n in names}
    for r in range(int(runs)):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            times[n].append(_invoke_us(interps[n], index[n], samples[n][r % len(samples[n])]))
    return {n: float(np.median(times[n])) for n in names}


def describe(model):
    """Input/output dtype, shape and quantization of a model, as plain values."""
    data = model_bytes(model)  # read once: for the interpreter and for the size
    interp = load_interpreter(data)

    def _one(d):
        scale, zp = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name,
                "shape": [int(s) for s in d["shape"]], "scale": float(scale),
                "zero_point": int(zp)}
    return {"inputs": [_one(d) for d in interp.get_input_details()],
            "outputs": [_one(d) for d in interp.get_output_details()],
            "size_bytes": len(data)}
