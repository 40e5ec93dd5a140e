"""Android benchmarks over adb with TFLite's `benchmark_model` (the user provides the binary).

Drives the real `adb` client: lists devices and their state, records device facts (getprop),
pushes the model and the binary to /data/local/tmp, makes the binary executable, runs it with
threads / delegate / warm-up / runs / op profiling, parses its output
(`benchmark_output.parse`), and removes what it pushed. A sweep over threads x delegates writes
JSON and CSV after every run, so finished results survive a later failure.

The adb program is `adb_path`, else $TFLITE_EXT_ADB, else `adb` on PATH.

Example:
    >>> from tflite_ext.bench import android
    >>> r = android.run_benchmark("digits_int8.tflite", "benchmark_model", threads=4,
    ...                           delegate="xnnpack")
    >>> r["device"]["model"], r["timings_us"]["inference_avg"]
    ('Pixel 7', 183.2)
"""
import csv
import io
import json
import os
import shlex
import shutil
import subprocess

from tflite_ext.bench import benchmark_output
from tflite_ext.errors import BenchmarkFailed, DeviceError, InputError, RunTimeout
from tflite_ext.files import atomic_write, ensure_writable_dir, read_model_bytes

ADB_ENV = "TFLITE_EXT_ADB"
REMOTE_DIR = "/data/local/tmp"
PID_FILE = f"{REMOTE_DIR}/tflite_ext_benchmark.pid"
DELEGATES = {"cpu": "--use_xnnpack=false", "xnnpack": "--use_xnnpack=true",
             "gpu": "--use_gpu=true", "nnapi": "--use_nnapi=true"}
FACT_PROPS = {"model": ("ro.product.model",), "abi": ("ro.product.cpu.abi",),
              "soc": ("ro.soc.model", "ro.board.platform", "ro.hardware"),
              "android": ("ro.build.version.release",), "sdk": ("ro.build.version.sdk",)}
# ELF e_machine values for the ABIs Android ships.
_ELF_MACHINES = {0x28: "armeabi-v7a", 0xB7: "arm64-v8a", 0x03: "x86", 0x3E: "x86_64",
                 0xF3: "riscv64"}
CSV_FIELDS = ("serial", "model", "soc", "abi", "android", "threads", "delegate", "warmup_runs",
              "num_runs", "status", "inference_avg_us", "inference_min_us", "inference_max_us",
              "inference_std_us", "init_us", "first_inference_us", "memory_overall_mb", "error")


def find_adb(adb_path=None):
    """Path of the adb program: the argument, $TFLITE_EXT_ADB, or `adb` on PATH."""
    candidate = adb_path or os.environ.get(ADB_ENV) or "adb"
    resolved = shutil.which(candidate)
    if resolved is None:
        raise DeviceError("adb not found: install the Debian package `adb` (apt-get install adb) "
                          f"or set ${ADB_ENV}. Received: adb={candidate!r}")
    return resolved


class Adb:
    """Runs the adb client. `server_port` picks a private adb server (adb -P)."""

    def __init__(self, adb_path=None, server_port=None, timeout=60):
        self.path = find_adb(adb_path)
        self.server_port = server_port
        self.timeout = timeout

    def run(self, args, serial=None, timeout=None):
        """Runs `adb [-P port] [-s serial] args...`; returns (exit status, stdout+stderr)."""
        cmd = [self.path]
        if self.server_port:
            cmd += ["-P", str(self.server_port)]
        if serial:
            cmd += ["-s", serial]
        cmd += list(args)
        limit = timeout or self.timeout
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=limit)
        except subprocess.TimeoutExpired:
            raise RunTimeout(f"adb {' '.join(args[:1])} did not finish within {limit}s on "
                             f"{serial or 'the device'}. Received: timeout={limit}") from None
        except OSError as e:
            raise DeviceError(f"Cannot run adb ({e.strerror}). Received: adb={self.path!r}") \
                from None
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    def shell(self, serial, command, timeout=None):
        return self.run(["shell", command], serial, timeout)

    def devices(self):
        """[{"serial", "state", "details"}] from `adb devices -l` (states: device,
        unauthorized, offline, ...)."""
        status, out = self.run(["devices", "-l"])
        if status != 0:
            raise DeviceError(f"adb devices failed: {_last_line(out)}")
        found = []
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith("List of devices") or line.startswith("*"):
                continue
            parts = line.split()
            if len(parts) >= 2:
                found.append({"serial": parts[0], "state": parts[1],
                              "details": " ".join(parts[2:])})
        return found


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def select_devices(adb, serial=None):
    """Serials to run on: `serial` if given, else every attached device; all must be ready."""
    attached = adb.devices()
    if not attached:
        raise DeviceError("No Android device attached (adb devices lists none): connect one with "
                          "USB debugging on, or pass -s SERIAL. Received: devices=[]")
    if serial:
        chosen = [d for d in attached if d["serial"] == serial]
        if not chosen:
            raise DeviceError(f"Device {serial} is not attached. Received: serial={serial!r}, "
                              f"attached={[d['serial'] for d in attached]}")
    else:
        chosen = attached
    for d in chosen:
        if d["state"] == "unauthorized":
            raise DeviceError(f"Device {d['serial']} is unauthorized: unlock it and accept the "
                              "'Allow USB debugging' prompt. Received: state='unauthorized'")
        if d["state"] != "device":
            raise DeviceError(f"Device {d['serial']} is {d['state']}: reconnect it (adb "
                              f"reconnect) and retry. Received: state={d['state']!r}")
    return [d["serial"] for d in chosen]


def device_facts(adb, serial):
    """Model, ABI, SoC and Android version from `getprop`."""
    status, out = adb.shell(serial, "getprop")
    if status != 0:
        raise DeviceError(f"getprop failed on {serial}: {_last_line(out)}")
    props = {}
    for line in out.splitlines():
        if line.startswith("[") and "]: [" in line:
            key, value = line.split("]: [", 1)
            props[key[1:]] = value.rstrip().rstrip("]")
    facts = {"serial": serial}
    for name, keys in FACT_PROPS.items():
        facts[name] = next((props[k] for k in keys if props.get(k)), "")
    return facts


def binary_abi(path):
    """The Android ABI a local ELF executable is built for, or raises a one-line error."""
    if not os.path.isfile(path):
        raise InputError(f"benchmark_model binary not found. Received: binary={path!r}")
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise InputError("benchmark_model binary is not an ELF executable (build it for Android "
                         f"or download the prebuilt one). Received: binary={path!r}")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"e_machine={machine:#x}")


def _compatible(binary, device):
    if binary == device:
        return True
    return (binary, device) in (("armeabi-v7a", "arm64-v8a"), ("x86", "x86_64"))


class DeviceSession:
    """Pushed files on one device; `close()` removes exactly what was pushed."""

    def __init__(self, adb, serial, model, binary, push_timeout=300):
        self.adb, self.serial, self.pushed = adb, serial, []
        self.facts = device_facts(adb, serial)
        abi = binary_abi(binary)
        if self.facts["abi"] and not _compatible(abi, self.facts["abi"]):
            raise DeviceError(f"benchmark_model is built for {abi} but device {serial} is "
                              f"{self.facts['abi']}: use a build for that ABI. "
                              f"Received: binary={binary!r}")
        try:
            self._prepare(model, binary, push_timeout)
        except BaseException:
            self.close()   # remove whatever was already pushed
            raise

    def _prepare(self, model, binary, push_timeout):
        adb, serial = self.adb, self.serial
        self.model = self._push(model, push_timeout)
        self.binary = self._push(binary, push_timeout)
        status, out = adb.shell(serial, f"chmod 755 {shlex.quote(self.binary)}")
        if status != 0:
            raise DeviceError(f"chmod failed for {self.binary} on {serial}: {_last_line(out)}")
        _, out = adb.shell(serial, f"test -x {shlex.quote(self.binary)} && echo yes || echo no")
        if out.strip().splitlines()[-1:] != ["yes"]:
            raise DeviceError(f"{self.binary} is not executable on {serial} after chmod (noexec "
                              f"storage?). Received: {_last_line(out)!r}")

    def _push(self, local, timeout):
        remote = f"{REMOTE_DIR}/{os.path.basename(local)}"
        status, out = self.adb.run(["push", local, remote], self.serial, timeout)
        if status != 0:
            raise DeviceError(f"adb push of {os.path.basename(local)} to {self.serial} failed: "
                              f"{_last_line(out)}")
        self.pushed.append(remote)
        return remote

    def run(self, threads=1, delegate="cpu", warmup_runs=1, num_runs=50, op_profiling=False,
            timeout=300, extra_flags=()):
        """Runs benchmark_model once; returns a result dict (raises on failure)."""
        flags = [f"--graph={self.model}", f"--num_threads={int(threads)}", DELEGATES[delegate],
                 f"--warmup_runs={int(warmup_runs)}", f"--num_runs={int(num_runs)}"]
        if op_profiling:
            flags.append("--enable_op_profiling=true")
        flags += list(extra_flags)
        # `exec` makes the recorded shell pid the benchmark's pid, so a hang can be killed.
        command = (f"cd {REMOTE_DIR} && echo $$ > {PID_FILE} && exec "
                   f"{shlex.quote(self.binary)} " + " ".join(shlex.quote(f) for f in flags))
        where = f"{self.serial} (threads={threads}, delegate={delegate})"
        try:
            status, out = self.adb.shell(self.serial, command, timeout)
        except RunTimeout:
            self._kill_remote()
            raise RunTimeout(f"benchmark_model hung on {where}: no result within {timeout}s. "
                             f"Received: timeout={timeout}") from None
        if status in (126, 127) or "can't execute" in out or "not executable" in out:
            raise DeviceError(f"benchmark_model cannot run on {self.serial}: {_last_line(out)}")
        parsed = benchmark_output.parse(out)
        if status != 0 or not parsed["ok"]:
            reason = (parsed["errors"] or [_last_line(out)])[0]
            if parsed["delegate_failures"]:
                reason = f"Failed to apply {parsed['delegate_failures'][0]} delegate"
            raise BenchmarkFailed(f"benchmark_model failed on {where}: {reason}")
        return {"device": self.facts, "threads": int(threads), "delegate": delegate,
                "warmup_runs": int(warmup_runs), "num_runs": int(num_runs),
                "op_profiling": bool(op_profiling), "status": "ok", **_summary(parsed),
                "parsed": parsed}

    def _kill_remote(self):
        try:
            self.adb.shell(self.serial, f"kill $(cat {PID_FILE}) 2>/dev/null; rm -f {PID_FILE}",
                           timeout=15)
        except DeviceError:
            pass

    def close(self):
        if self.pushed:
            try:
                self.adb.shell(self.serial, "rm -f " + " ".join(
                    shlex.quote(p) for p in self.pushed + [PID_FILE]), timeout=30)
            except DeviceError:
                pass
            self.pushed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _summary(parsed):
    timings = parsed["timings_us"]
    stats = parsed["inference"] or {}
    return {"timings_us": timings,
            "inference_stats_us": stats,
            "memory_mb": parsed["memory_mb"],
            "format": parsed["format"]}


def _check_run_args(model, binary, threads, delegates):
    read_model_bytes(model)
    binary_abi(binary)
    bad = [d for d in delegates if d not in DELEGATES]
    if bad:
        raise InputError(f"delegate must be one of {sorted(DELEGATES)}. "
                         f"Received: delegate={bad[0]!r}")
    if any(int(t) < 1 for t in threads):
        raise InputError(f"threads must be >= 1. Received: threads={list(threads)}")


def run_benchmark(model, binary, *, serial=None, threads=1, delegate="cpu", warmup_runs=1,
                  num_runs=50, op_profiling=False, timeout=300, adb=None, adb_path=None):
    """One benchmark_model run on each selected device (`serial`, or all attached).

    Returns a list of result dicts (one per device); raises a DeviceError subclass with a
    one-line message on the first failure. Pushed files are always removed.
    """
    _check_run_args(model, binary, [threads], [delegate])
    adb = adb or Adb(adb_path)
    results = []
    for s in select_devices(adb, serial):
        with DeviceSession(adb, s, model, binary) as session:
            results.append(session.run(threads, delegate, warmup_runs, num_runs, op_profiling,
                                       timeout))
    return results


def csv_row(result):
    device = result.get("device", {})
    timings = result.get("timings_us", {})
    return {"serial": device.get("serial", ""), "model": device.get("model", ""),
            "soc": device.get("soc", ""), "abi": device.get("abi", ""),
            "android": device.get("android", ""), "threads": result.get("threads"),
            "delegate": result.get("delegate"), "warmup_runs": result.get("warmup_runs"),
            "num_runs": result.get("num_runs"), "status": result.get("status"),
            "inference_avg_us": timings.get("inference_avg", ""),
            "inference_min_us": result.get("inference_stats_us", {}).get("min", ""),
            "inference_max_us": result.get("inference_stats_us", {}).get("max", ""),
            "inference_std_us": result.get("inference_stats_us", {}).get("std", ""),
            "init_us": timings.get("init", ""),
            "first_inference_us": timings.get("first_inference", ""),
            "memory_overall_mb": result.get("memory_mb", {}).get("overall", ""),
            "error": result.get("error", "")}


def records(results):
    """Results as saved and printed: the raw `parsed` output left out, except its op
    profiling tables when there are some."""
    return [{k: v for k, v in r.items() if k != "parsed"} | (
        {"op_profiling_tables": r["parsed"]["op_profiling"]}
        if r.get("parsed", {}).get("op_profiling") else {}) for r in results]


def write_results(results, out_dir, stem="android"):
    """Writes `<stem>.json` and `<stem>.csv` atomically; returns both paths."""
    ensure_writable_dir(out_dir)
    json_path = atomic_write(os.path.join(out_dir, f"{stem}.json"),
                             json.dumps(records(results), indent=2, default=str))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow(csv_row(r))
    csv_path = atomic_write(os.path.join(out_dir, f"{stem}.csv"), buffer.getvalue())
    return json_path, csv_path


def sweep(model, binary, out_dir, *, serial=None, threads=(1, 2, 4),
          delegates=("cpu", "xnnpack"), warmup_runs=1, num_runs=50, op_profiling=False,
          timeout=300, adb=None, adb_path=None):
    """Runs every (threads, delegate) pair on each selected device.

    A failed run (delegate error, crash, hang) is recorded with status "failed" and its
    one-line error, and the sweep goes on; android.json and android.csv are rewritten after
    every run (when out_dir is not None), so finished results are kept whatever happens next.
    Pushed files are removed at the end.

    Returns:
        (results list, json path, csv path).
    """
    _check_run_args(model, binary, threads, delegates)
    if out_dir is not None:
        ensure_writable_dir(out_dir)
    adb = adb or Adb(adb_path)
    results = []
    paths = (None, None)
    for s in select_devices(adb, serial):
        with DeviceSession(adb, s, model, binary) as session:
            for t in threads:
                for d in delegates:
                    try:
                        results.append(session.run(t, d, warmup_runs, num_runs, op_profiling,
                                                   timeout))
                    except DeviceError as e:
                        results.append({"device": session.facts, "threads": int(t),
                                        "delegate": d, "warmup_runs": int(warmup_runs),
                                        "num_runs": int(num_runs), "status": "failed",
                                        "error": str(e)})
                    if out_dir is not None:
                        paths = write_results(results, out_dir)
    return results, paths[0], paths[1]
