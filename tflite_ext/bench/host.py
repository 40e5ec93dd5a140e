"""Host benchmarks through LiteRT (`ai_edge_litert`): latency, thread sweep, XNNPACK, accuracy.

Two timers: `time_model`, our own loop (µs precision, `Interpreter.invoke` alone), and
`time_litert_benchmark`, the official `litert-benchmark` of ai-edge-litert 2.3 run as a program
(its CompiledModel loop, always with XNNPACK, times rounded to 0.01 ms).

Example:
    >>> from tflite_ext.bench import host
    >>> host.time_model("build/digits_int8.tflite", runs=100)["median_us"]
    142.0
    >>> host.time_litert_benchmark("build/resnet8_int8.tflite", runs=100)["median_us"]
    140.0
    >>> host.evaluate("build/digits_int8.tflite", split.x_test, split.y_test)["accuracy"]
    0.9963
"""
import contextlib
import importlib.util
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from ai_edge_litert import interpreter as litert

from tflite_ext import flatbuffer_check, native_log
from tflite_ext.errors import (BenchmarkFailed, InputError, ModelFileError, RunTimeout,
                               TfliteExtError)


def model_bytes(model):
    """Returns flatbuffer bytes from bytes or a path, checked by `flatbuffer_check` (exists,
    non-empty, and safe to hand to LiteRT or TFLM)."""
    return flatbuffer_check.load(model)[0]


@contextlib.contextmanager
def runtime_errors(model, runtime="LiteRT"):
    """Turns what an interpreter raises on a checked model (a kernel's Prepare or Eval failing,
    a tensor it cannot set) into a one-line ModelFileError naming the model.

    Example:
        >>> with host.runtime_errors("m.tflite"):
        ...     interp.invoke()
        ModelFileError: LiteRT cannot run the model (... Node number 2 (CONV_2D) failed to
        prepare.). Received: m.tflite
    """
    try:
        yield
    except TfliteExtError:
        raise
    except (RuntimeError, ValueError) as e:
        raise ModelFileError(f"{runtime} cannot run the model ({_first_line(e)}). "
                             f"Received: {flatbuffer_check.label_of(model)}") from None


def _first_line(error):
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def load_interpreter(model, num_threads=1, xnnpack=True, reference=False):
    """Returns an allocated LiteRT interpreter for bytes or a path.

    `xnnpack=False` selects the builtin op resolver without default delegates, which is how
    LiteRT turns XNNPACK off; `reference=True` selects LiteRT's reference kernels (plain loops,
    no SIMD: a host cost that follows MACs the way a microcontroller's does).
    """
    if int(num_threads) < 1:
        raise InputError(f"num_threads must be >= 1. Received: num_threads={num_threads}")
    resolver = (litert.OpResolverType.BUILTIN_REF if reference
                else litert.OpResolverType.AUTO if xnnpack
                else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    data = model_bytes(model)
    try:
        with native_log.captured():  # "INFO: Created ... XNNPACK delegate": not for the user
            interp = litert.Interpreter(model_content=data, num_threads=int(num_threads),
                                        experimental_op_resolver_type=resolver)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"LiteRT cannot load the model ({_first_line(e)}). "
                             f"Received: {flatbuffer_check.label_of(model)}") from None
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


def _invoke_us(interp, index, sample, clock=time.perf_counter_ns):
    interp.set_tensor(index, sample[None])
    start = clock()
    interp.invoke()
    return (clock() - start) / 1000.0


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
    with runtime_errors(model):
        samples = _prepared_inputs(interp, x)
        index = interp.get_input_details()[0]["index"]
        for i in range(int(warmup)):
            _invoke_us(interp, index, samples[i % len(samples)])
        times = [_invoke_us(interp, index, samples[i % len(samples)]) for i in range(int(runs))]
    return {**latency_stats(times), "warmup": int(warmup), "num_threads": int(num_threads),
            "xnnpack": bool(xnnpack)}


def thread_sweep(model, threads=(1, 2, 4), xnnpack=(True, False), *, runs=50, warmup=5, x=None,
                 timers=("own",), program=None):
    """Times every (threads, xnnpack) pair with each of `timers`; returns a list of row dicts.

    Args:
        timers: "own" (`time_model`: its keys go straight into the row) and/or "litert"
            (`time_litert_benchmark`, under the row's "litert" key). litert-benchmark always
            runs XNNPACK, so an XNNPACK-off row gets {"skipped": why} there instead.
        program: the litert-benchmark to run (see `litert_benchmark_command`).

    Example:
        >>> rows = host.thread_sweep("m.tflite", (1,), (True,), timers=("own", "litert"))
        >>> rows[0]["median_us"], rows[0]["litert"]["median_us"]
        (134.4, 140.0)
    """
    unknown = sorted(set(timers) - {"own", "litert"})
    if unknown or not timers:
        raise InputError(f"timers must be 'own' and/or 'litert'. Received: timers={timers!r}")
    rows = []
    for t, xn in itertools.product(threads, xnnpack):
        row = {"num_threads": int(t), "xnnpack": bool(xn)}
        if "own" in timers:
            row.update(time_model(model, runs=runs, warmup=warmup, num_threads=t, xnnpack=xn, x=x))
        if "litert" in timers:
            row["litert"] = (time_litert_benchmark(model, runs=runs, warmup=warmup, num_threads=t,
                                                   program=program) if xn else
                             {"skipped": "litert-benchmark always runs XNNPACK"})
        rows.append(row)
    return rows


# litert-benchmark prints and writes milliseconds rounded to two decimals.
LITERT_RESOLUTION_US = 10.0
_LITERT_MODULE = "ai_edge_litert.tools.benchmark_litert_model"


def litert_benchmark_command(program=None):
    """The argv prefix that runs litert-benchmark.

    Args:
        program: a path or name of the program; default: `litert-benchmark` on PATH, else the
            module it runs (`python -m ai_edge_litert.tools.benchmark_litert_model`), which is
            there whenever ai-edge-litert >= 2.3 is, PATH or not.

    Example:
        >>> host.litert_benchmark_command()
        ['/usr/local/bin/litert-benchmark']
    """
    if program:
        found = shutil.which(program)
        if not found:
            raise InputError(f"litert-benchmark program not found or not executable: give the "
                             f"path of ai-edge-litert's litert-benchmark. Received: "
                             f"program={program!r}")
        return [found]
    found = shutil.which("litert-benchmark")
    if found:
        return [found]
    if importlib.util.find_spec(_LITERT_MODULE) is not None:
        return [sys.executable, "-m", _LITERT_MODULE]
    raise InputError("litert-benchmark not found: install ai-edge-litert>=2.3 (pip install "
                     "'ai-edge-litert>=2.3'), pass its path, or time with the own timer only. "
                     "Received: program=None")


def time_litert_benchmark(model, *, runs=50, warmup=5, num_threads=1, program=None,
                          timeout=600):
    """Times a model with the official `litert-benchmark` (ai-edge-litert), as a program.

    Its numbers are milliseconds rounded to two decimals, in the printed text and the JSON
    alike, so each time is a multiple of 10 µs (`resolution_us`) and a model under 5 µs reads
    0.0. Its throughput line (input MB / mean seconds, also two decimals) pins the mean much
    finer, so `mean_from_throughput_us` gives the mean recovered from it, with the bound
    `mean_from_throughput_error_us` (None where that is no finer than `mean_us`).

    Args:
        model: .tflite bytes or path.
        runs, warmup: `--num_runs` and `--warmup_runs`.
        num_threads: `--num_threads`.
        program: the litert-benchmark to run (see `litert_benchmark_command`).
        timeout: seconds before the run counts as hung.

    Returns:
        dict with median_us, mean_us, min_us, max_us, p5_us, p95_us, std_us, init_us, runs,
        warmup, num_threads, xnnpack (always True), resolution_us, mean_from_throughput_us,
        mean_from_throughput_error_us, accelerators, fully_accelerated, timer, command.

    Example:
        >>> r = host.time_litert_benchmark("build/resnet8_int8.tflite", runs=200)
        >>> r["median_us"], r["resolution_us"], round(r["mean_from_throughput_us"], 1)
        (140.0, 10.0, 139.4)
    """
    from tflite_ext.bench import benchmark_output

    if int(runs) < 1 or int(warmup) < 0 or int(num_threads) < 1:
        raise InputError(f"runs and num_threads must be >= 1 and warmup >= 0. Received: "
                         f"runs={runs}, warmup={warmup}, num_threads={num_threads}")
    data = model_bytes(model)
    given = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    command = litert_benchmark_command(program)
    with tempfile.TemporaryDirectory(prefix="tflite_ext-litert-") as folder:
        path = given or os.path.join(folder, "model.tflite")
        if not given:  # the tool reads a file: bytes go to one in the run's own folder
            with open(path, "wb") as f:
                f.write(data)
        json_path = os.path.join(folder, "result.json")
        argv = command + [f"--model={path}", f"--num_runs={int(runs)}",
                          f"--warmup_runs={int(warmup)}", f"--num_threads={int(num_threads)}",
                          f"--result_json={json_path}"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RunTimeout(f"litert-benchmark did not finish in {timeout} s; raise the timeout "
                             f"or lower --runs. Received: runs={runs}") from None
        text = done.stderr + done.stdout
        parsed = (benchmark_output.parse_result_json(json_path) if os.path.isfile(json_path)
                  else benchmark_output.parse(text))
    if done.returncode != 0 or not parsed["ok"]:
        why = benchmark_output.parse(text)["errors"] or [ln for ln in text.splitlines()
                                                         if ln.strip()][-1:] or ["no output"]
        raise BenchmarkFailed(f"litert-benchmark failed (exit {done.returncode}: {why[-1]}). "
                              f"Received: model={given or 'bytes'}, {len(data)} bytes")
    # The command as one could type it again: the temporary files it named are gone.
    shown = command + [f"--model={given or 'MODEL.tflite'}", *argv[len(command) + 1:-1],
                       "--result_json=RESULT.json"]
    return _litert_timing(parsed, data, runs, warmup, num_threads, shown)


def _litert_timing(parsed, data, runs, warmup, num_threads, argv):
    t = parsed["timings_us"]
    result = {"timer": "litert-benchmark",
              **{f"{k}_us": t.get(f"inference_{k}") for k in ("median", "min", "max", "p5",
                                                              "p95", "std")},
              "mean_us": t["inference_avg"], "init_us": t.get("init"), "runs": int(runs),
              "warmup": int(warmup), "num_threads": int(num_threads), "xnnpack": True,
              "resolution_us": parsed["resolution_us"] or LITERT_RESOLUTION_US,
              "accelerators": parsed["litert"].get("accelerators"),
              "fully_accelerated": parsed["litert"].get("fully_accelerated"),
              "command": shlex.join(argv)}
    result.update(_mean_from_throughput(parsed, data, result))
    return result


def _mean_from_throughput(parsed, data, timing):
    """The mean the throughput line implies: input MB / (MB/s), bounded by its rounding."""
    throughput = parsed["litert"].get("throughput")
    none = {"mean_from_throughput_us": None, "mean_from_throughput_error_us": None}
    if not throughput or throughput <= 0.005:
        return none
    # litert-benchmark counts prod(shape) * itemsize over the signature's inputs, in MiB.
    mib = sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
              for d in describe(data)["inputs"]) / 2**20
    mean = mib / throughput * 1e6
    error = max(mib / (throughput - 0.005) * 1e6 - mean, mean - mib / (throughput + 0.005) * 1e6)
    half_step = timing["resolution_us"] / 2
    # Only where it is finer than the printed mean, and only if it agrees with it (if it did
    # not, the tool counted other input bytes than we do).
    if error >= half_step or abs(mean - timing["mean_us"]) > half_step + error:
        return none
    return {"mean_from_throughput_us": mean, "mean_from_throughput_error_us": error}


def predict(model, x, num_threads=1):
    """Float outputs (dequantized with the model's own parameters) for float samples x."""
    interp = load_interpreter(model, num_threads)
    in_detail, out_detail = interp.get_input_details()[0], interp.get_output_details()[0]
    q = quantize(_check_samples(x, in_detail), in_detail)
    outputs = []
    with runtime_errors(model):
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


def time_interleaved(models, x=None, runs=200, warmup=10, num_threads=1, xnnpack=True,
                     reference=False, cpu_time=False):
    """Median per-sample latency (µs) of several variants timed round-robin in one process.

    Interleaving spreads clock-speed drift and background load evenly over the variants, so
    their medians are comparable. The order within each round rotates to avoid position bias.

    Args:
        models: {name: .tflite bytes or path}.
        x: optional float samples cycled through (quantized per model); random otherwise.
        xnnpack, reference: the kernels timed (`load_interpreter`); `reference=True` gives
            LiteRT's reference kernels, closer to a microcontroller, where cost follows MACs.
        cpu_time: time the calling thread's CPU time instead of the wall clock (1 thread
            only): what the model computes, not what other processes on the machine take from
            it. Millisecond-long reference-kernel runs on a busy machine need it.

    Returns:
        {name: median_us}.
    """
    if not models:
        raise InputError("Need at least one model to time. Received: models={}")
    if cpu_time and int(num_threads) != 1:
        raise InputError(f"cpu_time measures one thread. Received: num_threads={num_threads}")
    clock = time.thread_time_ns if cpu_time else time.perf_counter_ns
    names = list(models)
    interps = {n: load_interpreter(models[n], num_threads, xnnpack, reference) for n in names}
    samples, index = {}, {}
    for n in names:
        with runtime_errors(models[n]):
            samples[n] = _prepared_inputs(interps[n], x)
            index[n] = interps[n].get_input_details()[0]["index"]
            for i in range(int(warmup)):
                _invoke_us(interps[n], index[n], samples[n][i % len(samples[n])])
    times = {n: [] for n in names}
    for r in range(int(runs)):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            with runtime_errors(models[n]):  # warm-up ran it: this only costs a try
                times[n].append(_invoke_us(interps[n], index[n],
                                           samples[n][r % len(samples[n])], clock))
    return {n: float(np.median(times[n])) for n in names}


def describe(model):
    """Input/output dtype, shape and quantization of a model, as plain values."""
    data = model_bytes(model)  # read once: for the interpreter and for the size
    interp = load_interpreter(data)
    with runtime_errors(model):
        inputs, outputs = interp.get_input_details(), interp.get_output_details()

    def _one(d):
        scale, zp = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name,
                "shape": [int(s) for s in d["shape"]], "scale": float(scale),
                "zero_point": int(zp)}
    return {"inputs": [_one(d) for d in inputs], "outputs": [_one(d) for d in outputs],
            "size_bytes": len(data)}


def describe_cpu():
    """The CPU model and the vector extensions that LiteRT's int8 kernels speed up with."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()

    def field(key):
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")

    extensions = [e for e in ("avx2", "avx512f", "amx_int8") if e in field("flags").split()]
    name = field("model name") or platform.machine()
    return f"{name} ({', '.join(extensions)})" if extensions else name
