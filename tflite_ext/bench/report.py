"""Benchmark reports: JSON + Markdown for every benchmark, PNG plots for variant comparisons.

Every file goes through `atomic_write`: a report appears whole or not at all.

Example:
    >>> from tflite_ext.bench import report
    >>> report.write_report("build/bench", "host", result, report.host_markdown(result))
    >>> report.plot_variants([
    ...     {"name": "float32", "accuracy": 0.998, "size_bytes": 1034676, "latency_us": 164.5},
    ...     {"name": "int8", "accuracy": 0.998, "size_bytes": 277968, "latency_us": 120.2},
    ... ], "build/plots")
    ['build/plots/accuracy_vs_size.png', 'build/plots/accuracy_vs_latency.png']
"""
import io
import json
import os

from tflite_ext.errors import InputError
from tflite_ext.files import atomic_write, ensure_writable_dir


def to_json(data):
    """JSON text for a result (numpy scalars and other objects fall back to str/float)."""
    def default(value):
        if hasattr(value, "item"):
            return value.item()
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)
    return json.dumps(data, indent=2, default=default) + "\n"


def _cell(value, fmt=None):
    if value is None:
        return ""
    if fmt is not None:  # a column's own format: "{:.4f}", "{:.2f}×", or a callable
        return fmt(value) if callable(fmt) else fmt.format(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _cells(rows, columns):
    """Header and formatted cells; a column is (key, header) or (key, header, format)."""
    return ([c[1] for c in columns],
            [[_cell(row.get(c[0]), *c[2:]) for c in columns] for row in rows])


def markdown_table(rows, columns):
    """A Markdown table; `columns` is [(key, header)] or [(key, header, format)].

    Example:
        >>> print(markdown_table([{"name": "int8", "acc": 0.99}],
        ...                      [("name", "variant"), ("acc", "accuracy", "{:.4f}")]))
        | variant | accuracy |
        |---|---|
        | int8 | 0.9900 |
    """
    header, body = _cells(rows, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def text_table(rows, columns):
    """The same table in fixed-width text for a terminal: first column left, others right."""
    header, body = _cells(rows, columns)
    table = [header] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in table)




def _litert_cell(row, key):
    """A litert-benchmark figure with its rounding: '140 ±5', '< 5', or the finer mean."""
    from tflite_ext.bench.host import LITERT_RESOLUTION_US  # host imports the runtime
    lit = row.get("litert") or {}
    if "skipped" in lit:
        return "n/a (always XNNPACK)"
    if key == "mean_us" and lit.get("mean_from_throughput_us") is not None:
        # Rounded up to 0.01 µs, so the bound printed is never tighter than the real one.
        error = max(lit["mean_from_throughput_error_us"], 0.01)
        return f"{lit['mean_from_throughput_us']:,.2f} ±{error:.2f}"
    value, half = lit.get(key), lit.get("resolution_us", LITERT_RESOLUTION_US) / 2
    if value is None:
        return ""
    return f"< {half:g}" if value < half else f"{value:,.0f} ±{half:g}"


def host_markdown(result):
    """The host report: model, CPU, accuracy, then one row per configuration and timer."""
    own = "own" in result["timers"]
    litert = "litert" in result["timers"]
    columns = [("num_threads", "threads"), ("xnnpack", "XNNPACK")]
    if own:
        columns += [("median_us", "median µs (own)")]
    if litert:
        columns += [("litert_median", "median µs (litert-benchmark)")]
    if own:
        columns += [("mean_us", "mean µs (own)")]
    if litert:
        columns += [("litert_mean", "mean µs (litert-benchmark)")]
    if own:
        columns += [("min_us", "min µs (own)"), ("p90_us", "p90 µs (own)"),
                    ("max_us", "max µs (own)")]
    columns += [("runs", "runs")]
    rows = [{**row, "runs": row.get("runs", (row.get("litert") or {}).get("runs")),
             "litert_median": _litert_cell(row, "median_us"),
             "litert_mean": _litert_cell(row, "mean_us")} for row in result["latency"]]
    lines = [f"# Host benchmark (LiteRT): {result['model']}", "",
             f"Model size: {result['size_bytes']:,} bytes", "",
             f"CPU: {result['cpu']}, {result['cpus']} logical CPUs", ""]
    if result.get("accuracy") is not None:
        lines += [f"Accuracy: {result['accuracy']:.4f} on {result['samples']} samples", ""]
    lines.append(markdown_table(rows, columns))
    if litert:
        lines += ["litert-benchmark prints and writes milliseconds with two decimals, so its "
                  "median is a multiple of 10 µs (±5 µs; under 5 µs it reads 0.00 ms). Its mean "
                  "is recovered finer from its throughput line (input MiB / mean s, two "
                  "decimals). It times CompiledModel.run_by_name with random inputs; own times "
                  "Interpreter.invoke alone.", ""]
    return "\n".join(lines)


def micro_markdown(result):
    """Markdown for a `micro.analyze` result."""
    lat = result["latency"]
    rows = [("model (flash) bytes", result["size_bytes"]),
            ("tensor arena bytes (exact minimum)", result["arena_bytes"]),
            ("arena suggestion for an MCU", result["arena_suggestion"]),
            ("recording allocator total", result["arena_report"].get("total")),
            ("host latency through TFLM, median µs", lat["median_us"])]
    agree = result.get("agreement")
    if agree:
        rows += [("TFLM vs LiteRT top-1 agreement", agree["top1_agreement"]),
                 ("largest output difference (quantization steps)", agree["max_diff_steps"]),
                 ("samples compared", agree["samples"])]
    rows += _compression_rows(result.get("compression"))
    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(result["op_counts"].items()))
    return (f"# TFLite Micro: {result.get('model', '')}\n\n"
            + markdown_table([{"k": k, "v": v} for k, v in rows],
                             [("k", "measure"), ("v", "value")])
            + f"\nOperators: {ops}\n")


def _compression_rows(c):
    """Rows of a LUT-compressed model's `micro.analyze` result (none for other models)."""
    if not c:
        return []
    rows = [("LUT-compressed tensors (TFLM_DECODE ops)", f"{c['tensors']} ({c['decode_ops']})"),
            ("compressed weights: bits per weight", f"{c['bits_per_weight']:.2f}"),
            ("Huffman stage on the indices could reach (estimate)",
             f"~{c['huffman_estimate_bytes']:,} bytes"),
            ("largest decode buffer (bytes)", c["decode_buffer_bytes"]),
            ("alt_decompression_memory_size", c["alt_decompression_memory_size"])]
    if "arena_bytes_with_alt" in c:
        rows.append((f"arena with alt_decompression_memory_size={c['alt_suggestion']}",
                     c["arena_bytes_with_alt"]))
    ref = c.get("reference")
    if ref:
        rows += [("uncompressed model bytes / flash saved",
                  f"{ref['size_bytes']:,} / {ref['flash_saved_bytes']:,}"),
                 ("uncompressed model arena bytes", ref["arena_bytes"]),
                 ("decode cost, host TFLM median µs", f"{ref['decode_cost_us']:+.1f}"),
                 ("outputs bit-identical to the uncompressed model", ref["identical"])]
    return rows


_ANDROID_COLUMNS = [("serial", "serial"), ("model", "device"), ("soc", "SoC"),
                    ("android", "Android"), ("threads", "threads"), ("delegate", "delegate"),
                    ("status", "status"), ("inference_avg_us", "avg µs"),
                    ("inference_min_us", "min µs"), ("init_us", "init µs"), ("error", "error")]


def android_markdown(results):
    """Markdown for a list of Android run results (as from `android.sweep`)."""
    from tflite_ext.bench.android import csv_row
    return "# Android benchmark (benchmark_model over adb)\n\n" + markdown_table(
        [csv_row(r) for r in results], _ANDROID_COLUMNS)


def write_report(out_dir, name, data, markdown):
    """Writes `<name>.json` and `<name>.md` into out_dir; returns both paths."""
    ensure_writable_dir(out_dir)
    return (atomic_write(os.path.join(out_dir, f"{name}.json"), to_json(data)),
            atomic_write(os.path.join(out_dir, f"{name}.md"), markdown))


def _check_variants(variants, key):
    if not variants:
        raise InputError("Need at least one variant to plot. Received: variants=[]")
    for v in variants:
        missing = [k for k in ("name", "accuracy", key) if v.get(k) is None]
        if missing:
            raise InputError(f"Each variant needs name, accuracy and {key}. "
                             f"Received: {v.get('name', v)!r} without {missing[0]}")


def _scatter(variants, key, xlabel, title, log_x):
    # A bare Figure renders to PNG without pyplot: no window, and no global backend switch
    # in the caller's (possibly interactive) session.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.subplots()
    for v in variants:
        x = v[key] / 1024.0 if key == "size_bytes" else v[key]
        ax.scatter([x], [v["accuracy"] * 100.0], s=45)
        ax.annotate(v["name"], (x, v["accuracy"] * 100.0), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_variants(variants, out_dir, prefix=""):
    """Two PNGs: accuracy vs size and accuracy vs latency for a list of variants.

    Args:
        variants: [{"name", "accuracy" (0-1), "size_bytes", "latency_us"}]; a variant without
            latency_us is left out of the latency plot only.
        out_dir: folder for `<prefix>accuracy_vs_size.png` and `<prefix>accuracy_vs_latency.png`.

    Returns:
        The written paths.
    """
    _check_variants(variants, "size_bytes")
    ensure_writable_dir(out_dir)
    sizes = [v["size_bytes"] for v in variants]
    paths = [atomic_write(os.path.join(out_dir, f"{prefix}accuracy_vs_size.png"),
                          _scatter(variants, "size_bytes", ".tflite size (KiB)",
                                   "Accuracy vs model size", max(sizes) > 8 * min(sizes)))]
    timed = [v for v in variants if v.get("latency_us") is not None]
    if timed:
        paths.append(atomic_write(os.path.join(out_dir, f"{prefix}accuracy_vs_latency.png"),
                                  _scatter(timed, "latency_us", "median latency (µs)",
                                           "Accuracy vs latency", False)))
    return paths
