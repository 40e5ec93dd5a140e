"""TensorFlow Lite Micro on the host: op check, exact arena, flash, latency, agreement, C export.

Everything runs the real TFLM interpreter from the `tflite_micro` package. Attempts that may
fail inside TFLM (probing ops, trying an arena size) run in a child process: an arena that is
far too small can make TFLM crash the whole process, and a crash must not take the caller
with it. The child is kept from one attempt to the next (a new one after a crash): the exact
arena of a model takes a dozen attempts, 2.5 s with a process each, 0.1 s with one.

Example:
    >>> from tflite_ext.bench import micro
    >>> r = micro.analyze("build/digits_int8.tflite", x=split.x_test)
    >>> r["arena_bytes"], r["size_bytes"], r["agreement"]["top1_agreement"]
    (10640, 277968, 1.0)
    >>> micro.write_c_source("build/digits_int8.tflite", "build/mcu", name="digits_model")
"""
import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

import flatbuffers
import numpy as np
from tflite_micro import runtime
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

from tflite_ext import inspect
from tflite_ext.bench import host
from tflite_ext.errors import InputError, TfliteExtError
from tflite_ext.files import atomic_write, ensure_writable_dir

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_RECORD_ARENA = 16 * 1024 * 1024   # generous arena for the allocation report
# How TFLM says it has no kernel: for a builtin op, and for a custom op (TFLM_DECODE on a
# runtime without decompression).
_MISSING_OPS = ("Didn't find op for", "Failed to get registration from op code")

# The child process: tiny on purpose (imports only numpy + tflite_micro, ~0.3 s to start),
# and kept for the next job (`_Child`).
_WORKER = r'''
import json, os, sys, tempfile
import numpy as np
from tflite_micro import runtime

def captured(fn):
    """Runs fn with C-level fd 2 redirected to a temp file: TFLM logs there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            try:
                value, error = fn(), None
            except Exception as e:
                value, error = None, str(e)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return value, error, log.read().decode("utf-8", "replace")

def run(path, arena, n_inputs, report, alt):
    def go():
        with open(path, "rb") as f:
            data = f.read()
        it = runtime.Interpreter.from_bytes(data, arena_size=arena,
                                            alt_decompression_memory_size=alt)
        for i in range(n_inputs):
            d = it.get_input_details(i)
            it.set_input(np.zeros(d["shape"], d["dtype"]), i)
        it.invoke()
        if report:
            it.print_allocations()
    _, error, log = captured(go)
    print(json.dumps({"ok": error is None, "error": error, "log": log}), flush=True)

# One job (a JSON line) after another from stdin, each answered by a line per path and "END".
for line in iter(sys.stdin.readline, ""):
    job = json.loads(line)
    for path in job["paths"]:
        run(path, job["arena"], job["inputs"], job.get("report", False), job.get("alt", 0))
    print("END", flush=True)
'''


class _Child:
    """The TFLM worker process, kept between jobs: a start costs ~0.3 s, and finding one
    model's exact arena takes a dozen jobs. A crash ends it; the next job starts another.

    Every attempt TFLM refuses (an arena too small) keeps a copy of the model in the child
    (measured: its memory grows by the file's size each time), so after MAX_REFUSED_BYTES of
    them the child is replaced."""

    MAX_REFUSED_BYTES = 64 << 20

    def __init__(self):
        self.log = tempfile.TemporaryFile()  # what the child writes to fd 2 outside a run
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log)
        self.pid, self.buffer, self.refused = os.getpid(), b"", 0

    def usable(self):
        """Alive, this process's own (not inherited through a fork), and not grown too big."""
        return (self.pid == os.getpid() and self.proc.poll() is None
                and self.refused < self.MAX_REFUSED_BYTES)

    def ask(self, job, timeout):
        """The child's results for `job`, and whether it is still alive after it."""
        results = []
        self.log.seek(0)
        self.log.truncate()  # a crash's log is this job's, not an earlier one's
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return results, False
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line is None:  # end of output: the child died
                return results, False
            if line == b"END":
                if len(results) != len(job["paths"]):
                    raise TfliteExtError(f"The TFLM child answered {len(results)} of "
                                         f"{len(job['paths'])} models")
                for path, result in zip(job["paths"], results):
                    if not result["ok"]:
                        self.refused += os.path.getsize(path)
                return results, True
            if line.startswith(b"{"):
                results.append(json.loads(line))

    def _line(self, deadline):
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.strip()

    def close(self):
        """Ends the child (if still running) and returns (exit status, the end of its log)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable: leave it to the OS
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.log.seek(0)
        tail = self.log.read().decode("utf-8", "replace")[-2000:]
        self.log.close()
        return self.proc.returncode, tail


_child = None
_child_lock = threading.Lock()  # one job at a time on the shared pipes


def _run_worker(paths, arena, n_inputs, report=False, timeout=120, alt=0):
    """Runs model files through TFLM in a child; returns one result per path (crash-safe:
    the results stop after a crash, the path it crashed on marked `crashed`).
    `alt`: TFLM's alt_decompression_memory_size (bytes DECODE outputs may use outside the
    arena; 0: none)."""
    global _child
    job = {"paths": [os.path.abspath(p) for p in paths], "arena": int(arena),
           "inputs": int(n_inputs), "report": report, "alt": int(alt)}
    with _child_lock:
        while True:
            reused = _child is not None and _child.usable()
            if not reused:
                if _child is not None and _child.pid == os.getpid():
                    _child.close()
                _child = _Child()
            try:
                results, alive = _child.ask(job, timeout)
            except BaseException as e:
                # Interrupted (a timeout, Ctrl-C, SIGTERM) or garbled: the child may still
                # answer this job later, into the next one's reading. It goes.
                _child.close()
                _child = None
                if isinstance(e, TimeoutError):
                    raise TfliteExtError(f"TFLM did not finish within {timeout}s. "
                                         f"Received: arena_size={arena}") from None
                raise
            if alive:
                return results
            status, log = _child.close()
            _child = None
            if results or not reused:  # a kept child may have died before this job: anew
                break
    if len(results) < len(paths):   # the child crashed on the next path
        results.append({"ok": False, "crashed": True, "error": f"TFLM crashed "
                        f"(exit status {status})", "log": log})
    return results


@atexit.register
def _stop_child():
    global _child
    if _child is not None and _child.pid == os.getpid():
        _child.close()
    _child = None


def _op_name(model, opcode_index):
    code = model.operatorCodes[opcode_index]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode
        return f"CUSTOM:{custom.decode() if isinstance(custom, bytes) else custom}"
    return _OP_NAMES.get(builtin, str(builtin))


def _single_op_models(data):
    """{op name: flatbuffer holding only the first operator of that kind} for op probing."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    first = {}
    for subgraph in model.subgraphs or []:
        for op in subgraph.operators or []:
            first.setdefault(op.opcodeIndex, (subgraph, op))
    model.signatureDefs = None
    original = list(model.subgraphs)
    probes = {}
    for opcode_index, (subgraph, op) in first.items():
        def is_variable(t, subgraph=subgraph):
            buffer = model.buffers[subgraph.tensors[t].buffer] if model.buffers else None
            return buffer is None or buffer.data is None or len(buffer.data) == 0
        probe = schema.SubGraphT()
        probe.tensors, probe.operators, probe.name = subgraph.tensors, [op], subgraph.name
        # An op may list no inputs or outputs at all (a vector left out, not an empty one).
        probe.inputs = [t for t in (op.inputs if op.inputs is not None else [])
                        if t >= 0 and is_variable(t)]
        probe.outputs = list(op.outputs) if op.outputs is not None else []
        model.subgraphs = [probe] + original[1:]   # TFLM runs subgraph 0
        builder = flatbuffers.Builder(len(data) + 1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        probes[_op_name(model, opcode_index)] = bytes(builder.Output())
    return probes


def unsupported_ops(model):
    """Names of the model's operators that this TFLM build has no kernel for.

    Each distinct operator is probed alone in the real TFLM interpreter, which looks up
    kernels by op code before running anything: a missing kernel is reported as
    "Didn't find op for builtin opcode ...". That gives the complete list, not just the
    first missing op TFLM stops at.
    """
    data = host.model_bytes(model)
    probes = _single_op_models(data)
    missing = []
    with tempfile.TemporaryDirectory() as tmp:
        pending = []
        for i, (name, blob) in enumerate(probes.items()):
            path = os.path.join(tmp, f"probe{i}.tflite")
            with open(path, "wb") as f:
                f.write(blob)
            pending.append((name, path))
        while pending:
            results = _run_worker([p for _, p in pending], _RECORD_ARENA, 0)
            for (name, _), result in zip(pending, results):
                said = result["log"] + (result["error"] or "")
                if any(marker in said for marker in _MISSING_OPS):
                    missing.append(name)
            # A crash is past the kernel lookup, so that op has a kernel; go on after it.
            pending = pending[len(results):]
    return sorted(missing)


def allocation_report(model, n_inputs=1, alt=0):
    """The RecordingMicroAllocator report after one invoke, parsed into a dict.

    Returns:
        {"total": bytes, "head": bytes, "tail": bytes, "lines": [report lines]}.
    """
    data = host.model_bytes(model)
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(data)
        f.flush()
        result = _run_worker([f.name], max(_RECORD_ARENA, 10 * len(data)), n_inputs,
                             report=True, alt=alt)[0]
    if not result["ok"]:
        raise TfliteExtError(f"TFLM cannot run the model: {_last_line(result)}")
    report = {"lines": [line for line in result["log"].splitlines()
                         if "RecordingMicroAllocator" in line]}
    for line in report["lines"]:
        for key in ("total", "head", "tail"):
            marker = f"Arena allocation {key} "
            if marker in line:
                report[key] = int(line.split(marker)[1].split()[0])
    if "total" not in report:
        raise TfliteExtError("TFLM printed no allocation report (print_allocations). "
                             f"Received: {result['log'][-200:]!r}")
    return report


def _last_line(result):
    lines = [line.strip() for line in (result.get("log") or "").splitlines() if line.strip()]
    return lines[-1] if lines else (result.get("error") or "unknown error")


def arena_works(model, arena_size, n_inputs=1, alt=0):
    """True when TFLM can allocate and invoke the model in `arena_size` bytes (with `alt`
    bytes of alternate decompression memory)."""
    data = host.model_bytes(model)
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(data)
        f.flush()
        return _run_worker([f.name], arena_size, n_inputs, alt=alt)[0]["ok"]


def minimum_arena(model, n_inputs=1, report_total=None, alt=0):
    """Exact smallest tensor arena (bytes) TFLM runs the model in, by bisection.

    The recording allocator's total is usually the answer or a little below it (it can leave
    out the allocator objects TFLM places in the arena itself), so the search brackets the
    answer around that total, widening by doubling steps, then bisects to the byte. Every
    attempt runs in a child process: a much-too-small arena may crash TFLM.
    """
    data = host.model_bytes(model)
    low = report_total if report_total is not None else allocation_report(data, n_inputs,
                                                                            alt)["total"]
    low -= 1
    step = 512
    while low > 0 and arena_works(data, low, n_inputs, alt):   # rare: the total over-estimates
        low, step = max(0, low - step), step * 2
    step = 512
    high = low + step
    while not arena_works(data, high, n_inputs, alt):
        low, step = high, step * 2
        high = low + step
        if high > _RECORD_ARENA:
            raise TfliteExtError(f"No tensor arena up to {_RECORD_ARENA} bytes works for this "
                                 "model in TFLM")
    while high - low > 1:
        mid = (low + high) // 2
        if arena_works(data, mid, n_inputs, alt):
            high = mid
        else:
            low = mid
    return high


def check_model(model):
    """Raises a one-line error if TFLM cannot run the model or it is not full-integer.

    The message names each problem and its fix, e.g. "micro needs a full-integer model with
    kernels in TFLite Micro: FLOOR#2 ('model/floor/Floor') stays float: ...; input 'x' is
    float32: convert with io_dtype='int8' (the default). Received: ops=[...]".
    Returns the `inspect.summary` of the model.
    """
    data = host.model_bytes(model)
    info = inspect.summary(data)
    problems = [f"TFLM has no kernel for {op}: replace that layer, or measure the model with "
                f"LiteRT (bench host)" for op in unsupported_ops(data)]
    if not info["full_integer"]:
        problems += _float_problems(info)
    problems += _softmax_problems(info)
    if problems:
        raise InputError("micro needs a full-integer model with kernels in TFLite Micro: "
                         f"{'; '.join(problems)}. Received: ops={sorted(info['op_counts'])}")
    return info


# TFLM's int8 SOFTMAX turns input_scale * 2^26 into a fixed-point multiplier that must be
# > 1, and aborts the process otherwise (a check in its Prepare, no error returned).
_SOFTMAX_MIN_INPUT_SCALE = 2.0 ** -26


def _softmax_problems(info):
    """SOFTMAX ops whose input scale TFLM's kernel cannot take (it would abort, not fail)."""
    tensors = {(t["subgraph"], t["index"]): t for t in info["tensors"]}
    problems = []
    for op in info["operators"]:
        if op["op"] != "SOFTMAX" or not op["inputs"]:
            continue
        t = tensors[(op["subgraph"], op["inputs"][0])]
        scale = (t["quantization"] or {}).get("scale") or [1.0]
        if t["dtype"] == "int8" and scale[0] <= _SOFTMAX_MIN_INPUT_SCALE:
            problems.append(
                f"SOFTMAX#{op['index']}{_named(t['name'])} has input scale {scale[0]:.2g}, below "
                f"the 2^-26 TFLM's kernel needs (it aborts): the logits were all near zero "
                "when calibrated (an untrained model?); calibrate on real data")
    return problems


def _named(name):
    """" ('name')" for a problem's tensor, or nothing for an unnamed one (`names.strip`)."""
    return f" ('{name}')" if name else ""


def _float_problems(info):
    """What keeps an inspected model from being full integer, each with its fix."""
    integer = any(t["dtype"] in ("int8", "uint8", "int16") and not t["const_bytes"]
                  and t["quantization"] for t in info["tensors"])
    if not integer:  # a float (or float16 / dynamic-range) model: it was never converted to int8
        return ["the model computes in float: convert it with "
                "tflite_ext.convert.to_tflite(model, representative_data) (mode='int8', the "
                "default)"]
    problems = [f"{kind}{' ' + repr(t['name']) if t['name'] else ''} is {t['dtype']}: convert "
                f"with io_dtype='int8' (the default)" for kind in ("input", "output")
                for t in info[f"{kind}s"] if t["dtype"] in inspect.FLOAT_TYPES]
    by_type = {}
    for op in info["operators"]:
        # QUANTIZE/DEQUANTIZE only bridge to the float I/O or float ops named here.
        if op["float_tensors"] and op["op"] not in ("QUANTIZE", "DEQUANTIZE"):
            by_type.setdefault(op["op"], []).append(op)
    for kind, ops in sorted(by_type.items()):
        labels = ", ".join(f"{op['op']}#{op['index']}"
                           + (f" in subgraph {op['subgraph']}" if op["subgraph"] else "")
                           + (_named(op["float_tensors"][-1]) if op["float_tensors"] else "")
                           for op in ops)
        # to_tflite(mode='int8') refuses a float op unless allow_float names it.
        problems.append(f"{labels} stays float (the converter had no int8 kernel for it and "
                        f"allow_float let it stay): replace that layer with one that has an int8 "
                        f"kernel, then convert without {kind!r} in allow_float")
    return problems or [f"float tensors {', '.join(info['float_tensors'][:5])}: convert with "
                        f"io_dtype='int8' and nothing in allow_float"]


def _quantized_samples(detail, x, count):
    if x is not None:
        x = host._check_samples(np.asarray(x, np.float32), detail)  # shape, and not empty
        return host.quantize(x, {"dtype": detail["dtype"],
                             "quantization": _quant(detail)})
    rng = np.random.default_rng(0)
    info = np.iinfo(detail["dtype"])
    shape = (count, *detail["shape"][1:])
    return rng.integers(info.min, info.max + 1, size=shape).astype(detail["dtype"])


def _quant(detail):
    q = detail["quantization_parameters"]
    return (float(q["scales"][0]) if len(q["scales"]) else 0.0,
            int(q["zero_points"][0]) if len(q["zero_points"]) else 0)


TFLM = "TFLite Micro"  # how runtime errors name it


def tflm_interpreter(model, arena_size, alt=0):
    """A TFLM interpreter with a verified-sufficient arena (the model is checked first)."""
    data = host.model_bytes(model)
    with host.runtime_errors(model, TFLM):
        return runtime.Interpreter.from_bytes(data, arena_size=int(arena_size),
                                              alt_decompression_memory_size=int(alt))


def agreement(model, x=None, arena_size=None, samples=100):
    """TFLM vs LiteRT on the same quantized inputs: top-1 agreement and largest step diff.

    Args:
        model: full-integer .tflite bytes or path.
        x: float samples (quantized with the model's input parameters); random int8 inputs
            if None.
        arena_size: TFLM arena; measured with `minimum_arena` if None.

    Returns:
        {"samples", "top1_agreement", "max_diff_steps", "mean_abs_diff_steps"}; diffs are in
        output quantization steps (raw integer differences).
    """
    data = host.model_bytes(model)
    arena = arena_size or minimum_arena(data)
    tflm = tflm_interpreter(data, arena)
    lite = host.load_interpreter(data)
    with host.runtime_errors(model, TFLM):
        detail = tflm.get_input_details(0)
    q = _quantized_samples(detail, x, samples)
    with host.runtime_errors(model):
        lite_in, lite_out = lite.get_input_details()[0], lite.get_output_details()[0]
    same, max_diff, total_diff, count = 0, 0, 0.0, 0
    for sample in q:
        with host.runtime_errors(model, TFLM):
            tflm.set_input(sample[None], 0)
            tflm.invoke()
            a = np.asarray(tflm.get_output(0)).astype(np.int64).reshape(-1)
        with host.runtime_errors(model):
            lite.set_tensor(lite_in["index"], sample[None])
            lite.invoke()
            b = lite.get_tensor(lite_out["index"]).astype(np.int64).reshape(-1)
        same += int(a.argmax() == b.argmax())
        diff = np.abs(a - b)
        max_diff = max(max_diff, int(diff.max()))
        total_diff += float(diff.mean())
        count += 1
    return {"samples": count, "top1_agreement": same / count, "max_diff_steps": max_diff,
            "mean_abs_diff_steps": total_diff / count}


def evaluate(model, x, y, arena_size=None):
    """Top-1 accuracy of a classifier .tflite run by TensorFlow Lite Micro: the runtime that
    runs a LUT-compressed file (LiteRT has no TFLM_DECODE), with `host.evaluate`'s result.

    Example:
        >>> micro.evaluate("digits_int8.lut.tflite", x_test, y_test)
        {'accuracy': 0.9926, 'samples': 540}
    """
    data = host.model_bytes(model)
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise InputError(f"x and y must have the same length. Received: len(x)={len(x)}, "
                         f"len(y)={len(y)}")
    tflm = tflm_interpreter(data, arena_size or minimum_arena(data))
    with host.runtime_errors(model, TFLM):
        q = _quantized_samples(tflm.get_input_details(0), x, len(x))
        hits = 0
        for sample, label in zip(q, y):
            tflm.set_input(sample[None], 0)
            tflm.invoke()
            hits += int(np.argmax(tflm.get_output(0)) == label)
    return {"accuracy": hits / len(y), "samples": int(len(y))}


def latency(model, arena_size, runs=20, warmup=2, x=None, alt=0):
    """Host latency (µs) of single invocations through the TFLM interpreter."""
    tflm = tflm_interpreter(model, arena_size, alt)
    with host.runtime_errors(model, TFLM):
        detail = tflm.get_input_details(0)
    q = _quantized_samples(detail, x, max(1, min(8, runs)))
    times = []
    with host.runtime_errors(model, TFLM):
        for i in range(int(warmup) + int(runs)):
            tflm.set_input(q[i % len(q)][None], 0)
            start = time.perf_counter_ns()
            tflm.invoke()
            if i >= warmup:
                times.append((time.perf_counter_ns() - start) / 1000.0)
    return host.latency_stats(times)


def suggested_arena(arena_bytes):
    """Arena to declare on an MCU: the measured minimum plus 16 bytes (TFLM aligns the
    arena start itself, losing up to 15 bytes on an unaligned buffer), rounded up to 16."""
    return (arena_bytes + 16 + 15) // 16 * 16


def decode_buffers(info):
    """Bytes the TFLM_DECODE ops write: {"largest": the biggest one op decodes at once,
    "total": all decoded tensors}. Each decoded tensor lives only until the op after its
    DECODE, in the arena, or in the alternate decompression memory if it fits there."""
    sizes = {(t["subgraph"], t["index"]): int(np.prod(t["shape"] or [1]))
             * _ITEM_BYTES.get(t["dtype"], 1) for t in info["tensors"]}
    per_op = [sum(sizes[op["subgraph"], i] for i in op["outputs"]) for op in info["operators"]
              if op["op"] == inspect.DECODE_OP]
    return {"largest": max(per_op, default=0), "total": sum(per_op)}


_ITEM_BYTES = {"int8": 1, "uint8": 1, "int16": 2, "int32": 4, "float32": 4}


def compression_report(data, info, n_inputs, alt, reference=None, x=None, runs=20,
                       arena=None):
    """What LUT compression costs and saves in TFLM (see `analyze`)."""
    found = info["compressed"]
    buffers = decode_buffers(info)
    elements = sum(t["elements"] for t in found)
    stored = sum(t["encoded_bytes"] + t["ancillary_bytes"] for t in found)
    out = {"tensors": len(found), "decode_ops": info["op_counts"].get(inspect.DECODE_OP, 0),
           "weights": elements, "stored_bytes": stored,
           "bits_per_weight": 8.0 * stored / elements if elements else None,
           "huffman_estimate_bytes": sum(t.get("huffman_estimate_bytes", 0) for t in found),
           "decode_buffer_bytes": buffers["largest"], "decoded_bytes": buffers["total"],
           "alt_decompression_memory_size": int(alt)}
    if not alt and buffers["largest"]:  # what the decode buffers cost the arena
        suggested = (buffers["largest"] + 15) // 16 * 16
        out["alt_suggestion"] = suggested
        out["arena_bytes_with_alt"] = minimum_arena(data, n_inputs, alt=suggested)
    if reference is not None:
        from tflite_ext import lut

        ref = host.model_bytes(reference)
        ref_arena = minimum_arena(ref, n_inputs)
        mine = latency(data, arena, runs=runs, x=x, alt=alt)
        theirs = latency(ref, ref_arena, runs=runs, x=x)
        out["reference"] = {
            "size_bytes": len(ref), "flash_saved_bytes": len(ref) - len(data),
            "arena_bytes": ref_arena, "latency": theirs,
            "decode_cost_us": mine["median_us"] - theirs["median_us"],
            "identical": lut.verify(ref, data, x if x is not None else _random_floats(ref),
                                    alt)["identical"]}
    return out


def _random_floats(model, count=20):
    """Float samples spanning a model's int8 input range (when no data is given)."""
    with host.runtime_errors(model, TFLM):
        detail = tflm_interpreter(model, max(1 << 20, 20 * len(model))).get_input_details(0)
    scale, zero = _quant(detail)
    q = _quantized_samples(detail, None, count).astype(np.float32)
    return (q - zero) * scale


def analyze(model, x=None, *, runs=20, arena_size=None, agreement_samples=100,
            alt_decompression_memory_size=0, reference=None):
    """Everything `tflite-ext micro` reports for one model.

    Args:
        model: full-integer .tflite bytes or path.
        x: optional float samples for latency and agreement (random int8 inputs otherwise).
        runs: TFLM invocations timed on the host.
        arena_size: if given, the arena the user plans to use; too small is an error.
        agreement_samples: samples compared when x is None.
        alt_decompression_memory_size: bytes of memory outside the arena that TFLM_DECODE
            outputs may use (a LUT-compressed model); the arena is measured with it.
        reference: the uncompressed int8 model of a LUT-compressed one: its arena, latency
            and outputs are compared (decode cost in µs, bit-identical outputs on `x`).

    Returns:
        dict with size_bytes (the flatbuffer, i.e. the model's share of flash: the C array
        holds exactly these bytes), op_counts, arena_bytes (exact minimum), arena_report,
        arena_suggestion, latency, agreement; for a LUT-compressed model also compression:
        tensors, decode_ops, stored_bytes, bits_per_weight, huffman_estimate_bytes (an
        estimate: no TFLM runtime decodes Huffman), decode_buffer_bytes (the largest set one
        DECODE writes; with alt_decompression_memory_size 0 they are in arena_bytes),
        alt_suggestion and arena_bytes_with_alt, and with `reference` its size, arena,
        latency, decode_cost_us and identical. LiteRT cannot run a compressed model, so its
        agreement is with the reference in TFLM. A model with ops TFLM lacks raises instead
        (see `check_model`), so there is no unsupported-ops field.
    """
    data = host.model_bytes(model)
    info = check_model(data)
    n_inputs = len(info["inputs"])
    alt = int(alt_decompression_memory_size or 0)
    if alt < 0:
        raise InputError(f"alt_decompression_memory_size must be >= 0. Received: "
                         f"alt_decompression_memory_size={alt}")
    compressed = bool(info["compressed"])
    if reference is not None and not compressed:
        raise InputError("reference compares a LUT-compressed model with its int8 original, "
                         "and this model has no TFLM_DECODE ops. Received: reference given")
    report = allocation_report(data, n_inputs, alt)
    arena = minimum_arena(data, n_inputs, report_total=report["total"], alt=alt)
    if arena_size is not None and int(arena_size) < arena:
        raise InputError(f"Tensor arena too small: TFLM needs {arena} bytes for this model. "
                         f"Received: arena_size={arena_size}")
    used = int(arena_size) if arena_size is not None else arena
    result = {
        "size_bytes": len(data),
        "op_counts": info["op_counts"],
        "arena_bytes": arena,
        "arena_report": {k: report[k] for k in ("total", "head", "tail") if k in report},
        "arena_suggestion": suggested_arena(arena),
        "latency": latency(data, used, runs=runs, x=x, alt=alt),
    }
    if compressed:  # LiteRT has no TFLM_DECODE kernel: compare with the reference instead
        result["compression"] = compression_report(data, info, n_inputs, alt, reference, x,
                                                   runs, used)
    else:
        result["agreement"] = agreement(data, x, used, samples=agreement_samples)
    return result


def _c_name(name):
    if not name.isidentifier():
        raise InputError(f"name must be a C identifier. Received: name={name!r}")
    return name


def c_source(model, name="model", arena_bytes=None):
    """Returns (header_text, source_text) holding the model as a 16-byte aligned array."""
    data = host.model_bytes(model)
    name = _c_name(name)
    guard = f"{name.upper()}_H_"
    arena_lines = ""
    if arena_bytes is not None:
        arena_lines = (f"// Smallest tensor arena measured with TFLM on the host: {arena_bytes} "
                       "bytes.\n// Suggested declaration size (adds start-alignment slack):\n"
                       f"#define {name.upper()}_ARENA_SIZE {suggested_arena(arena_bytes)}\n")
    header = (f"// Generated by tflite_ext. The .tflite flatbuffer as a C array.\n"
              f"#ifndef {guard}\n#define {guard}\n\n"
              f"#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n"
              f"#define {name.upper()}_LEN {len(data)}\n{arena_lines}"
              f"extern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n\n"
              f"#ifdef __cplusplus\n}}\n#endif\n\n#endif  // {guard}\n")
    rows = []
    for i in range(0, len(data), 12):
        rows.append("  " + ", ".join(f"0x{b:02x}" for b in data[i:i + 12]) + ",")
    source = (f"// Generated by tflite_ext. {len(data)} bytes; TFLM needs the array 16-byte "
              "aligned.\n"
              f"#include \"{name}.h\"\n\n"
              "#if defined(__cplusplus)\n#define TFLITE_EXT_ALIGN16 alignas(16)\n"
              "#else\n#define TFLITE_EXT_ALIGN16 _Alignas(16)\n#endif\n\n"
              f"TFLITE_EXT_ALIGN16 const unsigned char {name}[] = {{\n" + "\n".join(rows)
              + f"\n}};\nconst unsigned int {name}_len = {len(data)};\n")
    return header, source


def write_c_source(model, out_dir, name="model", arena_bytes=None):
    """Writes `<name>.h` and `<name>.c` into out_dir (atomically); returns both paths."""
    header, source = c_source(model, name, arena_bytes)
    ensure_writable_dir(out_dir)
    h = atomic_write(os.path.join(out_dir, f"{name}.h"), header)
    c = atomic_write(os.path.join(out_dir, f"{name}.c"), source)
    return h, c
