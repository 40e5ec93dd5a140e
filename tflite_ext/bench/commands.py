"""The `tflite-ext bench`, `micro` and `android` commands (absl flags, one FlagValues each).

`tflite_ext.cli` imports `COMMANDS`; each entry has `define_flags(fv)` and `main(fv) -> int`.
Errors are raised as `TfliteExtError` subclasses with one-line messages; the CLI prints them.
Every flag and path (the model a valid .tflite, --out_dir and --c_out writable, --threads
positive integers) is checked before any timing, device or TFLM work starts.

Example:
    $ tflite-ext bench --model build/digits_int8.tflite --threads 1,2 --xnnpack both --task digits
    $ tflite-ext bench build/resnet8_int8.tflite --timer both --runs 500
    $ tflite-ext micro --model build/digits_int8.tflite --task digits --c_out build/mcu
    $ tflite-ext android --model m.tflite --binary benchmark_model -s R58M12345 --json
"""
import collections
import os

from absl import flags

from tflite_ext.errors import InputError

Command = collections.namedtuple("Command", ["name", "help", "define_flags", "main"])


def _common_flags(fv):
    flags.DEFINE_string("model", None, "Path of the .tflite model.", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Write <command>.json and <command>.md reports here "
                        "(android adds android.csv).", flag_values=fv)
    flags.DEFINE_boolean("json", False, "Print JSON to stdout instead of a table.",
                         flag_values=fv)


def _eval_flags(fv):
    flags.DEFINE_enum("task", None, ["digits"], "Built-in evaluation data: digits = the sklearn "
                      "digits test split, resized to the model's input.", flag_values=fv)
    flags.DEFINE_string("eval_data", None, "A .npz with arrays x (float samples) and y "
                        "(integer labels) to evaluate on.", flag_values=fv)


def _require_model(fv):
    """--model, checked to be a TFLite flatbuffer; --out_dir, checked to be writable."""
    from tflite_ext import inspect
    from tflite_ext.files import ensure_writable_dir

    if not fv.model:
        raise InputError("--model is required: the .tflite to benchmark. Received: --model=None")
    inspect.summary(fv.model)  # a one-line error for a missing, empty or non-TFLite file
    if fv.out_dir:
        ensure_writable_dir(fv.out_dir)
    return fv.model


def _eval_arrays(fv, model):
    """(x, y) from --eval_data or --task, or (None, None)."""
    import numpy as np
    if fv.eval_data:
        from tflite_ext.files import read_model_bytes
        read_model_bytes(fv.eval_data)          # exists and non-empty, one-line error otherwise
        try:
            data = np.load(fv.eval_data)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive")
            with data:
                return data["x"], data["y"]
        except (KeyError, ValueError, OSError) as e:
            raise InputError(f"--eval_data must be a .npz holding arrays x and y ({e}). "
                             f"Received: {fv.eval_data!r}") from None
    if fv.task == "digits":
        from tflite_ext import inspect, tasks
        # Read from the flatbuffer, not LiteRT: a TFLM LUT model has ops LiteRT cannot load.
        shape = inspect.summary(model)["inputs"][0]["shape"]
        if len(shape) != 4:
            raise InputError(f"--task digits needs an image model (N, H, W, C). "
                             f"Received: input shape={shape}")
        split = tasks.digits(size=shape[1], channels=shape[3])
        return split.x_test, split.y_test
    return None, None


def _emit(fv, name, data, markdown):
    from tflite_ext.bench import report
    if fv.out_dir:
        report.write_report(fv.out_dir, name, data, markdown)
    print(report.to_json(data) if fv.json else markdown, end="")
    return 0


# ----------------------------------------------------------------------------- bench

def _bench_flags(fv):
    _common_flags(fv)
    _eval_flags(fv)
    flags.DEFINE_list("threads", ["1"], "LiteRT thread counts to sweep, comma separated.",
                      flag_values=fv)
    flags.DEFINE_enum("xnnpack", "on", ["on", "off", "both"], "Run with LiteRT's default "
                      "XNNPACK delegate on, off, or both.", flag_values=fv)
    flags.DEFINE_enum("timer", "both", ["own", "litert", "both"], "Who times the model: own "
                      "(this library's loop around Interpreter.invoke, µs precision), litert "
                      "(the official litert-benchmark of ai-edge-litert, run as a program: "
                      "CompiledModel, always XNNPACK, 0.01 ms steps), or both side by side "
                      "(the default: an official second opinion for about 1.5 s more per "
                      "configuration).",
                      flag_values=fv)
    flags.DEFINE_string("litert_benchmark", None, "The litert-benchmark program (default: "
                        "litert-benchmark on PATH, else python -m "
                        "ai_edge_litert.tools.benchmark_litert_model).", flag_values=fv)
    flags.DEFINE_integer("runs", 50, "Timed runs per configuration.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("warmup", 5, "Untimed warm-up runs.", lower_bound=0, flag_values=fv)


def _ints(values, name):
    """A comma-separated flag of counts: at least one, each an integer >= 1."""
    try:
        counts = [int(v) for v in values]
    except ValueError:
        counts = None
    if not counts or min(counts) < 1:
        raise InputError(f"--{name} must be integers >= 1, comma separated (e.g. 1,2,4). "
                         f"Received: --{name}={','.join(values)!r}") from None
    return counts


def _bench_main(fv):
    from tflite_ext.bench import host, report
    model = _require_model(fv)
    threads = _ints(fv.threads, "threads")
    timers = {"own": ("own",), "litert": ("litert",), "both": ("own", "litert")}[fv.timer]
    xnnpack = {"on": (True,), "off": (False,), "both": (True, False)}[fv.xnnpack]
    if timers == ("litert",) and xnnpack == (False,):
        raise InputError("--timer=litert cannot time --xnnpack=off: litert-benchmark always "
                         "runs XNNPACK. Received: --timer=litert --xnnpack=off")
    if "litert" in timers:  # fail before minutes of own timing, not after
        host.litert_benchmark_command(fv.litert_benchmark)
    x, y = _eval_arrays(fv, model)
    result = {"model": model, "size_bytes": len(host.model_bytes(model)),
              "cpu": host.describe_cpu(), "cpus": os.cpu_count(), "timers": list(timers),
              "latency": host.thread_sweep(model, threads, xnnpack,
                                           runs=fv.runs, warmup=fv.warmup, x=x, timers=timers,
                                           program=fv.litert_benchmark)}
    if y is not None:
        result.update(host.evaluate(model, x, y))
    return _emit(fv, "bench", result, report.host_markdown(result))


# ----------------------------------------------------------------------------- micro

def _micro_flags(fv):
    _common_flags(fv)
    _eval_flags(fv)
    flags.DEFINE_integer("runs", 20, "Timed TFLM invocations on the host.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("arena_size", None, "The tensor arena you plan to use (bytes); an "
                         "error if TFLM needs more.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("samples", 200, "Samples compared between TFLM and LiteRT.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("c_out", None, "Also write <c_name>.h and <c_name>.c (16-byte aligned "
                        "array, length and arena size) into this folder.", flag_values=fv)
    flags.DEFINE_string("c_name", "model", "C identifier of the exported array.", flag_values=fv)
    flags.DEFINE_integer("alt_memory", 0, "alt_decompression_memory_size: bytes outside the "
                         "arena for a LUT-compressed model's decode buffers.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_string("reference", None, "The uncompressed int8 .tflite of a LUT-compressed "
                        "model: compare size, arena, latency (decode cost) and outputs.",
                        flag_values=fv)


def _micro_main(fv):
    from tflite_ext.bench import micro, report
    from tflite_ext.files import ensure_writable_dir
    model = _require_model(fv)
    if fv.c_out:
        ensure_writable_dir(fv.c_out)
    x, _ = _eval_arrays(fv, model)
    if x is not None:
        x = x[:fv.samples]
    result = micro.analyze(model, x, runs=fv.runs, arena_size=fv.arena_size,
                           agreement_samples=fv.samples,
                           alt_decompression_memory_size=fv.alt_memory, reference=fv.reference)
    result["model"] = model
    if fv.c_out:
        result["c_files"] = list(micro.write_c_source(model, fv.c_out, fv.c_name,
                                                      result["arena_bytes"]))
    return _emit(fv, "micro", result, report.micro_markdown(result))


# ----------------------------------------------------------------------------- android

def _android_flags(fv):
    _common_flags(fv)
    flags.DEFINE_string("binary", None, "Path of the Android benchmark_model binary to push.",
                        flag_values=fv)
    flags.DEFINE_string("serial", None, "Run on this device only (default: every attached "
                        "device).", short_name="s", flag_values=fv)
    flags.DEFINE_list("threads", ["1"], "Thread counts to sweep, comma separated.",
                      flag_values=fv)
    flags.DEFINE_list("delegates", ["xnnpack"], "Delegates to sweep: cpu, xnnpack, gpu, nnapi.",
                      flag_values=fv)
    flags.DEFINE_integer("warmup_runs", 1, "benchmark_model --warmup_runs.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("num_runs", 50, "benchmark_model --num_runs.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_boolean("op_profiling", False, "Pass --enable_op_profiling=true.",
                         flag_values=fv)
    flags.DEFINE_integer("timeout", 300, "Seconds before a run counts as hung.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("adb", None, "The adb program (default: $TFLITE_EXT_ADB, then adb on "
                        "PATH).", flag_values=fv)


def _android_main(fv):
    from tflite_ext.bench import android, report
    from tflite_ext.files import atomic_write
    model = _require_model(fv)
    threads = _ints(fv.threads, "threads")
    if not fv.binary:
        raise InputError("--binary is required: the benchmark_model built for the device. "
                         "Received: --binary=None")
    results, _, _ = android.sweep(
        model, fv.binary, fv.out_dir, serial=fv.serial, threads=threads,
        delegates=fv.delegates, warmup_runs=fv.warmup_runs, num_runs=fv.num_runs,
        op_profiling=fv.op_profiling, timeout=fv.timeout, adb_path=fv.adb)
    markdown = report.android_markdown(results)
    if fv.out_dir:  # the sweep already wrote android.json and android.csv there
        atomic_write(os.path.join(fv.out_dir, "android.md"), markdown)
    print(report.to_json(android.records(results)) if fv.json else markdown, end="")
    return 0 if all(r["status"] == "ok" for r in results) else 1


COMMANDS = [
    Command("bench", "Time a .tflite with LiteRT on this machine (threads, XNNPACK on/off) and "
            "measure its accuracy.", _bench_flags, _bench_main),
    Command("micro", "Check a full-integer .tflite for TensorFlow Lite Micro: ops, exact arena, "
            "flash, host latency, agreement with LiteRT, C export.", _micro_flags, _micro_main),
    Command("android", "Run benchmark_model on Android devices over adb: sweep threads x "
            "delegates, write JSON + CSV.", _android_flags, _android_main),
]
