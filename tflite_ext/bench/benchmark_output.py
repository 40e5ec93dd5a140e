"""Parser for what TFLite's `benchmark_model` prints, in every form seen in the wild.

Handles lines with no prefix, with `INFO: `/`ERROR: `, and with an Android logcat prefix
(`I tflite  : `, optionally after a `threadtime` date/pid/tid); `%g` numbers (`2.95034e+06`);
`count=` lines with optional `p5/median/p95` tails and the one-run `count=1 curr=...` form;
both memory lines (`Memory footprint delta ...`, older `Peak memory footprint ...`, and
`Overall peak memory footprint (MB) via periodic monitoring`); the 2018-19
`Average inference timings in us: ...` summary (including its `no stats:` variant);
op-profiling tables; failures; and the LiteRT 2.x `benchmark_litert_model` format.

Times are normalised to microseconds in `timings_us`, whatever the tool printed.

Example:
    >>> from tflite_ext.bench.benchmark_output import parse
    >>> r = parse("INFO: Inference timings in us: Init: 530, First inference: 124020, "
    ...           "Warmup (avg): 117225, Inference (avg): 116066")
    >>> r["timings_us"]["inference_avg"]
    116066.0
"""
import re

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Optional logcat `threadtime` header, then optional logcat tag, then optional level word.
_PREFIX = re.compile(
    r"^(?:\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+)?"
    r"(?:(?P<logcat>[VDIWEF])\s+tflite\s*:\s?)?"
    r"(?:(?P<level>INFO|WARNING|ERROR|VERBOSE|DEBUG): )?"
    r"(?:\[[\w./-]+:\d+\]\s*)?")  # LiteRT 2.x adds "[file.h:94] "
_COUNT_LINE = re.compile(r"^count=\d+(?:\s+\w+=\S+)*\s*$")
_KEYVAL = re.compile(rf"(\w+)=({_NUM})")
_LITERT = re.compile(
    rf"^(Model initialization|Warmup \((?:first|avg)\)|Inference \(\w+\)|Throughput):\s*"
    rf"({_NUM})\s*([A-Za-z/]+)?\s*(?:\((\d+) runs\))?")
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
    """Returns (level, message) with any logcat/INFO prefix removed; level is 'E' for errors."""
    line = raw.rstrip("\r\n")
    m = _PREFIX.match(line)
    level = "E" if (m.group("logcat") == "E" or m.group("level") == "ERROR") else ""
    return level, line[m.end():]


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
        "op_profiling": {}, "litert": {},
    }


def parse(text):
    """Parses one `benchmark_model` run's combined stdout/stderr into a dict.

    Args:
        text: the tool's output (str), in any supported variant.

    Returns:
        A dict with `format` ("tflite", "tflite-2018", "litert2" or "unknown"), `ok`
        (finished and reported an inference time), `failed`, `errors`,
        `delegate_failures` (e.g. ["NNAPI"]), `warmup`/`inference` stats (µs, from the
        `count=` lines), `timings_us` (init, first_inference, warmup_avg, inference_avg,
        and for LiteRT 2.x also inference_min/max/std), `memory_mb`, `op_profiling`
        ({"init"|"runs": {table_name: [rows]}}), and `litert` (raw LiteRT 2.x fields).
    """
    result = _empty_result()
    count_lines = []
    section, table, columns = None, None, None
    for raw in text.splitlines():
        level, line = _strip_prefix(raw)
        stripped = line.strip()
        if level == "E" and stripped:
            result["errors"].append(stripped)
        if stripped == "Benchmarking failed.":
            result["failed"] = True
        delegate = re.search(r"Failed to apply (\w+) delegate", stripped)
        if delegate:
            result["delegate_failures"].append(delegate.group(1))

        # Op profiling tables: a section title, then "=== title ===", header, rows.
        if stripped in _SECTION_TITLES:
            section = result["op_profiling"].setdefault(_SECTION_TITLES[stripped], {})
            table, columns = None, None
            continue
        if section is not None:
            title = re.match(r"^=+\s*(.+?)\s*=+$", stripped)
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
        m = _LITERT.match(stripped)
        if m:
            _add_litert(result, m)

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
    label, value, unit, runs = m.group(1), float(m.group(2)), m.group(3), m.group(4)
    key = _snake(label)
    result["litert"][key] = value
    if unit:
        result["litert"][key + "_unit"] = unit
    if runs:
        result["litert"][key + "_runs"] = int(runs)
    scale = _UNIT_TO_US.get(unit or "ms")
    if scale is not None and label != "Throughput":
        name = {"model_initialization": "init", "warmup_first": "first_inference"}.get(key, key)
        result["timings_us"][name] = value * scale


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
    result["ok"] = not result["failed"] and "inference_avg" in timings
