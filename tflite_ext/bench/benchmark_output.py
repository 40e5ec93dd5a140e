"""Parser for what TFLite's `benchmark_model` prints, in every form seen in the wild.

Handles lines with no prefix, with `INFO: `/`ERROR: `, and with an Android logcat prefix
(`I tflite  : `, optionally after a `threadtime` date/pid/tid); `%g` numbers (`2.95034e+06`);
`count=` lines with optional `p5/median/p95` tails and the one-run `count=1 curr=...` form;
both memory lines (`Memory footprint delta ...`, older `Peak memory footprint ...`, and
`Overall peak memory footprint (MB) via periodic monitoring`); the 2018-19
`Average inference timings in us: ...` summary (including its `no stats:` variant);
op-profiling tables; failures; the LiteRT 2.x `benchmark_model` (`benchmark_litert_model.h`)
format with its memory block (`Init footprint`, `Overall footprint`, `Peak memory` or `Peak
memory usage not available`); and `litert-benchmark`, the Python tool in `ai-edge-litert` 2.3:
its printed results and, through `parse_result_json`, its `--result_json` file. Logs as pasted
into issues and CI are read too: indented, CRLF line ends, ANSI colours, Python-logging and
absl/glog prefixes.

Times are normalised to microseconds in `timings_us`, whatever the tool printed. The LiteRT 2.x
tools print milliseconds with two decimals, so their times are multiples of 10 µs;
`resolution_us` says so (10.0), and a sub-5 µs time reads 0.0.

Example:
    >>> from tflite_ext.bench.benchmark_output import parse
    >>> r = parse("INFO: Inference timings in us: Init: 530, First inference: 124020, "
    ...           "Warmup (avg): 117225, Inference (avg): 116066")
    >>> r["timings_us"]["inference_avg"]
    116066.0
"""
import decimal
import json
import os
import re

from tflite_ext.errors import InputError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Colours of a terminal log pasted as is (CSI sequences such as "\x1b[32m", and OSC titles).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
# In this order, each optional: indentation; a timestamp (CI logs, Python logging); Python
# logging's "LEVEL logger: " (litert-benchmark's stderr); an absl/glog header
# ("I0000 00:00:1758455104.504065   62590 file.cc:51] "); a logcat `threadtime` header; a
# logcat tag; a level word; LiteRT 2.x's "[file.h:94] ".
_PREFIX = re.compile(
    r"^\s*"
    r"(?:\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?Z?\s+)?"
    r"(?:(?P<pylevel>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+[\w.]+:\s)?"
    r"(?:(?P<glog>[IWEF])\d{4}\s+\d\d:\d\d:\d\d(?:\.\d+)?\s+\d+\s+[\w./-]+:\d+\]\s?)?"
    r"(?:\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+)?"
    r"(?:(?P<logcat>[VDIWEF])\s+tflite\s*:\s?)?"
    r"(?:(?P<level>INFO|WARNING|ERROR|VERBOSE|DEBUG): )?"
    r"(?:\[[\w./-]+:\d+\]\s*)?")
_COUNT_LINE = re.compile(r"^count=\d+(?:\s+\w+=\S+)*\s*$")
_KEYVAL = re.compile(rf"(\w+)=({_NUM})")
_LITERT = re.compile(
    rf"^(Model initialization|First inference|Warmup \((?:first|avg)\)|Inference \(\w+\)|"
    rf"Throughput):\s*({_NUM})\s*([A-Za-z/]+)?\s*(?:\((\d+) runs\))?")
_LITERT_TEXT = re.compile(r"^(Signature name|Fully accelerated):\s*(\S+)")
_FOOTPRINT = re.compile(rf"^(Init footprint|Overall footprint|Peak memory):\s*({_NUM})\s*MB")
_TABLE_TITLE = re.compile(r"^=+\s*([A-Za-z].*?)\s*=+$")  # "==== Run Order ====", not "====="
_SECTION_TITLES = {
    "Profiling Info for Benchmark Initialization:": "init",
    "Operator-wise Profiling Info for Regular Benchmark Runs:": "runs",
}
_UNIT_TO_US = {"ms": 1000.0, "us": 1.0, "s": 1e6}


def _snake(text):
    text = text.strip().lower().replace("%", " pct")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")


def _number(text):
    text = text.strip().rstrip("%")
    try:
        value = float(text)
    except ValueError:
        return None
    integral = value.is_integer() and "." not in text and "e" not in text.lower()
    return int(value) if integral else value


def _strip_prefix(raw):
    """Returns (level, message) with colours and any log prefix removed; 'E' marks errors."""
    line = _ANSI.sub("", raw).rstrip("\r\n")
    m = _PREFIX.match(line)
    error = (m.group("logcat") in ("E", "F") or m.group("glog") in ("E", "F")
             or m.group("level") == "ERROR" or m.group("pylevel") in ("ERROR", "CRITICAL"))
    return ("E" if error else ""), line[m.end():]


def _parse_table_header(line):
    names = re.findall(r"\[([^\]]+)\]", line)
    return [_snake(n) for n in names] if len(names) >= 3 else None


def _parse_table_row(line, columns):
    if "\t" in line:
        fields = [f.strip() for f in line.split("\t") if f.strip()]
    else:
        fields = line.split(None, len(columns) - 1)
    if len(fields) != len(columns):
        return None
    row = {}
    for column, field in zip(columns, fields):
        value = _number(field) if column not in ("node_type", "name") else None
        row[column] = value if value is not None else field
    return row


def _empty_result():
    return {
        "format": "unknown", "ok": False, "failed": False, "errors": [],
        "delegate_failures": [], "model_size_mb": None, "init_ms": None,
        "warmup": None, "inference": None, "timings_us": {}, "memory_mb": {},
        "op_profiling": {}, "litert": {}, "resolution_us": None,
    }


def parse(text):
    """Parses one `benchmark_model` run's combined stdout/stderr into a dict.

    Args:
        text: the tool's output (str), in any supported variant. Text that starts with "{" is
            read as a `litert-benchmark --result_json` file (see `parse_result_json`).

    Returns:
        A dict with `format` ("tflite", "tflite-2018", "litert2" for the LiteRT 2.x
        benchmark_model, "litert-benchmark" for the Python tool, or "unknown"), `ok`
        (finished and reported an inference time), `failed`, `errors`,
        `delegate_failures` (e.g. ["NNAPI"]), `warmup`/`inference` stats (µs, from the
        `count=` lines), `timings_us` (init, first_inference, warmup_avg, inference_avg,
        and for LiteRT 2.x also inference_min/max/std, and median/p5/p95 where printed),
        `memory_mb` (LiteRT 2.x: kind "footprint", init, overall, and peak, which is None
        when the tool says it is not available), `op_profiling`
        ({"init"|"runs": {table_name: [rows]}}), `litert` (raw LiteRT 2.x fields), and
        `resolution_us` (the rounding step of LiteRT 2.x times, else None).

    Example:
        >>> r = parse("Inference (median):    0.14 ms\r\nInit footprint:       8.94 MB\r\n")
        >>> r["timings_us"]["inference_median"], r["resolution_us"], r["memory_mb"]["init"]
        (140.0, 10.0, 8.94)
    """
    if text.lstrip().startswith("{"):
        return parse_result_json(text)
    result = _empty_result()
    python_tool = traceback = False
    count_lines = []
    section, table, columns = None, None, None
    for raw in text.splitlines():
        level, line = _strip_prefix(raw)
        stripped = line.strip()
        if level == "E" and stripped:
            result["errors"].append(stripped)
        if stripped == "Benchmarking failed.":
            result["failed"] = True
        # litert-benchmark fails with a Python traceback; its last "XxxError: ..." says why.
        traceback = traceback or stripped.startswith("Traceback (most recent call last)")
        if traceback and re.match(r"^[A-Z]\w*(?:Error|Exception|Exit): ", stripped):
            result["errors"].append(stripped)
            result["failed"] = True
        delegate = re.search(r"Failed to apply (\w+) delegate", stripped)
        if delegate:
            result["delegate_failures"].append(delegate.group(1))

        # Op profiling tables: a section title, then "=== title ===", header, rows.
        if stripped in _SECTION_TITLES:
            section = result["op_profiling"].setdefault(_SECTION_TITLES[stripped], {})
            table, columns = None, None
            continue
        title = _TABLE_TITLE.match(stripped)
        # LiteRT 2.x (--use_profiler) prints its run tables with no section title before them.
        if section is None and title and title.group(1) != "BENCHMARK RESULTS":
            section = result["op_profiling"].setdefault("runs", {})
        if section is not None:
            if title:
                table = section.setdefault(_snake(title.group(1)), [])
                columns = None
                continue
            if table is not None and columns is None:
                columns = _parse_table_header(stripped)
                if columns:
                    continue
            if table is not None and columns and stripped:
                row = _parse_table_row(line.strip("\n"), columns)
                if row is not None:
                    table.append(row)
                    continue
            if stripped.startswith("Timings (microseconds):") or stripped.startswith(
                    "Memory (bytes):") or stripped.endswith("nodes observed"):
                table, columns = None, None
                continue
            if not stripped:
                table, columns = None, None
                continue

        if _COUNT_LINE.match(stripped):
            count_lines.append({k: _number(v) for k, v in _KEYVAL.findall(stripped)})
            continue
        m = re.match(rf"^The input model file size \(MB\):\s*({_NUM})", stripped)
        if m:
            result["model_size_mb"] = float(m.group(1))
            continue
        m = re.match(rf"^Initialized session in ({_NUM})\s*ms", stripped)
        if m:
            result["init_ms"] = float(m.group(1))
            continue
        m = re.match(r"^(Average )?[Ii]nference timings in us:\s*(.*)$", stripped)
        if m:
            result["format"] = "tflite-2018" if m.group(1) else "tflite"
            for key, value in re.findall(rf"([A-Za-z][\w ()]*?):\s*({_NUM})", m.group(2)):
                result["timings_us"][_timing_key(key)] = float(value)
            continue
        m = re.match(r"^(Memory footprint delta from the start of the tool|Peak memory "
                     r"footprint) \(MB\):\s*(.*)$", stripped)
        if m:
            result["memory_mb"]["kind"] = "delta" if m.group(1).startswith("Memory") else "peak"
            for key, value in _KEYVAL.findall(m.group(2)):
                result["memory_mb"][key] = float(value)
            continue
        m = re.match(rf"^Overall peak memory footprint \(MB\) via periodic monitoring:\s*({_NUM})",
                     stripped)
        if m:
            result["memory_mb"]["overall_peak"] = float(m.group(1))
            continue
        m = _FOOTPRINT.match(stripped)
        if m:
            key = {"Init footprint": "init", "Overall footprint": "overall"}.get(m.group(1), "peak")
            result["memory_mb"]["kind"] = "footprint"
            result["memory_mb"][key] = float(m.group(2))
            continue
        if stripped.startswith("Peak memory usage not available"):
            result["memory_mb"]["kind"] = "footprint"
            result["memory_mb"]["peak"] = None
            continue
        # litert-benchmark prints its title alone between rules; benchmark_model on one line.
        python_tool = python_tool or stripped == "BENCHMARK RESULTS"
        m = _LITERT_TEXT.match(stripped)
        if m:
            name, value = _snake(m.group(1)), m.group(2)
            result["litert"][name] = {"True": True, "False": False}.get(value, value)
            continue
        m = _LITERT.match(stripped)
        if m:
            _add_litert(result, m)

    if python_tool and result["format"] == "litert2":
        result["format"] = "litert-benchmark"
    _finish(result, count_lines)
    return result


def _timing_key(label):
    label = label.strip().lower()
    if label in ("no stats", "inference"):
        return "inference_avg"
    if label == "warmup":
        return "warmup_avg"
    return _snake(label)


def _add_litert(result, m):
    result["format"] = "litert2"
    label, text, unit, runs = m.group(1), m.group(2), m.group(3), m.group(4)
    key = _snake(label)
    result["litert"][key] = float(text)
    if unit:
        result["litert"][key + "_unit"] = unit
    if runs:
        result["litert"][key + "_runs"] = int(runs)
    scale = _UNIT_TO_US.get(unit or "ms")  # benchmark_model prints its std without a unit
    if scale is not None and label != "Throughput":
        name = {"model_initialization": "init", "warmup_first": "first_inference"}.get(key, key)
        # Decimal keeps "0.46 ms" exactly 460 µs, as printed (0.46 * 1000 is 460.00000000000006).
        result["timings_us"][name] = float(decimal.Decimal(text) * decimal.Decimal(scale))
        if key.startswith("inference_"):
            step = float(decimal.Decimal(1).scaleb(decimal.Decimal(text).as_tuple().exponent)
                         * decimal.Decimal(scale))
            result["resolution_us"] = max(result["resolution_us"] or 0.0, step)


def _finish(result, count_lines):
    """Assigns count= lines: the last is the regular run; an earlier one is the warm-up."""
    if count_lines:
        result["inference"] = count_lines[-1]
        if len(count_lines) > 1:
            result["warmup"] = count_lines[0]
        if result["format"] == "unknown":
            result["format"] = "tflite"
    timings = result["timings_us"]
    if "inference_avg" not in timings and result["inference"]:
        stats = result["inference"]
        if "avg" in stats:
            timings["inference_avg"] = float(stats["avg"])
        elif stats.get("count") == 1 and "curr" in stats:
            timings["inference_avg"] = float(stats["curr"])
    # LiteRT 2.x prints "Inference (avg): 0.00 ms (0 runs)" when no run happened.
    ran = result["litert"].get("inference_avg_runs", 1) > 0
    result["ok"] = not result["failed"] and "inference_avg" in timings and ran


# litert-benchmark --result_json: its latency fields (ms) and what they are in `timings_us`.
_JSON_LATENCY = {"init_ms": "init", "warmup_first_ms": "first_inference",
                 "warmup_avg_ms": "warmup_avg", "avg_ms": "inference_avg",
                 "min_ms": "inference_min", "max_ms": "inference_max",
                 "median_ms": "inference_median", "std_ms": "inference_std",
                 "p5_ms": "inference_p5", "p95_ms": "inference_p95"}
# The tool writes round(ms, 2): every latency in the file is a multiple of 10 µs.
_JSON_RESOLUTION_US = 10.0


def parse_result_json(source):
    """Reads `litert-benchmark --result_json` output into the dict `parse` returns.

    (The C++ `benchmark_model --result_file_path` writes a binary protobuf, not this JSON.)

    Args:
        source: a path to the JSON file, its text, or the loaded dict.

    Returns:
        The `parse` dict with `format` "litert-benchmark-json", `timings_us` from the latency
        fields, `model_size_mb`, `resolution_us` 10.0, and in `litert` the tool's own fields
        (accelerators, signature, fully_accelerated, num_threads, throughput, run counts).

    Example:
        >>> r = parse_result_json("build/results.json")
        >>> r["timings_us"]["inference_median"], r["litert"]["accelerators"]
        (140.0, ['CPU'])
    """
    data = _load_json(source)
    latency = data.get("latency") if isinstance(data, dict) else None
    if not isinstance(latency, dict):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError("A litert-benchmark --result_json file holds a 'latency' object; this "
                         f"one does not. Received: keys={keys}")
    result = _empty_result()
    result["format"] = "litert-benchmark-json"
    result["model_size_mb"] = data.get("model_size_mb")
    result["resolution_us"] = _JSON_RESOLUTION_US
    for field, name in _JSON_LATENCY.items():
        if latency.get(field) is not None:
            result["timings_us"][name] = float(decimal.Decimal(str(latency[field])) * 1000)
    result["litert"] = {k: data[k] for k in ("model", "accelerators", "signature",
                                               "fully_accelerated", "num_threads") if k in data}
    if "throughput_mb_s" in data:
        result["litert"].update(throughput=data["throughput_mb_s"], throughput_unit="MB/s")
    result["litert"].update(inference_avg_runs=latency.get("num_runs"),
                            warmup_avg_runs=latency.get("num_warmup_runs"))
    result["ok"] = "inference_avg" in result["timings_us"] and bool(latency.get("num_runs"))
    return result


def _load_json(source):
    if isinstance(source, dict):
        return source
    text, where = source, "text"
    if not str(source).lstrip().startswith("{"):
        where = str(source)
        if not os.path.isfile(where):
            raise InputError(f"litert-benchmark result file not found. Received: path={where!r}")
        with open(where, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        head = text.strip()[:40]
        raise InputError(f"litert-benchmark --result_json output must be JSON ({e}). "
                         f"Received: {where} starting {head!r}") from None
