"""The benchmark_model / litert-benchmark parser: the variants of references.md, then real
outputs quoted from public docs and issues and captured on this machine, also as pasted."""
import json
import pathlib
import re

import pytest

from tflite_ext.bench.benchmark_output import parse, parse_result_json
from tflite_ext.errors import InputError

# The modern run quoted in references.md (tensorflow/tensorflow#61946), verbatim.
MODERN = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Graph: [./mobilenet_v1_1.0_224_quant.tflite]
INFO: Loaded model ./mobilenet_v1_1.0_224_quant.tflite
INFO: The input model file size (MB): 4.27635
INFO: Initialized session in 0.53ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=5 first=124020 curr=116061 min=115177 max=124020 avg=117225 std=3412

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=50 first=121183 curr=115199 min=111222 max=121324 avg=116066 std=1906

INFO: Inference timings in us: Init: 530, First inference: 124020, Warmup (avg): 117225, Inference (avg): 116066
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=3.75 overall=12.1914
"""


def _strip_info(text):
    return text.replace("INFO: ", "")


def _logcat(text):
    return "".join(f"05-31 10:31:13.023 21767 21767 I tflite  : {line}\n"
                   for line in text.splitlines())


@pytest.mark.parametrize("variant", [MODERN, _strip_info(MODERN), _logcat(_strip_info(MODERN)),
                                     "".join(f"I tflite  : {line}\n" for line in
                                             _strip_info(MODERN).splitlines())])
def test_modern_run_with_every_prefix(variant):
    r = parse(variant)
    assert r["ok"] and r["format"] == "tflite" and not r["errors"]
    assert r["model_size_mb"] == 4.27635 and r["init_ms"] == 0.53
    assert r["warmup"] == {"count": 5, "first": 124020, "curr": 116061, "min": 115177,
                           "max": 124020, "avg": 117225, "std": 3412}
    assert r["inference"]["count"] == 50 and r["inference"]["min"] == 111222
    assert r["timings_us"] == {"init": 530.0, "first_inference": 124020.0,
                               "warmup_avg": 117225.0, "inference_avg": 116066.0}
    assert r["memory_mb"] == {"kind": "delta", "init": 3.75, "overall": 12.1914}


def test_g_format_numbers():
    r = parse("count=50 first=2.95034e+06 curr=2.9e+06 min=2.8e+06 max=3.1e+06 "
              "avg=2.95034e+06 std=12000\n"
              "Inference timings in us: Init: 530, First inference: 2.95034e+06, "
              "Warmup (avg): 2.95034e+06, Inference (avg): 1.24027e+06\n")
    assert r["inference"]["avg"] == pytest.approx(2950340.0)
    assert r["timings_us"]["inference_avg"] == pytest.approx(1240270.0)


def test_percentile_tails_and_one_run_form():
    r = parse("count=1 curr=124020\n\n"
              "count=50 first=121183 curr=115199 min=111222 max=121324 avg=116066 std=1906 "
              "p5=112000 median=115800 p95=120100\n")
    assert r["warmup"] == {"count": 1, "curr": 124020}
    assert (r["inference"]["p5"], r["inference"]["median"], r["inference"]["p95"]) == (
        112000, 115800, 120100)
    assert r["timings_us"]["inference_avg"] == 116066.0 and r["ok"]
    only = parse("count=1 curr=124020\n")
    assert only["timings_us"]["inference_avg"] == 124020.0


def test_old_peak_memory_and_periodic_monitoring():
    r = parse("Peak memory footprint (MB): init=2.61328 overall=9.39844\n"
              "Overall peak memory footprint (MB) via periodic monitoring: 10.1289\n")
    assert r["memory_mb"] == {"kind": "peak", "init": 2.61328, "overall": 9.39844,
                              "overall_peak": 10.1289}


def test_2018_average_timings_and_no_stats_variant():
    r = parse("Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9")
    assert r["format"] == "tflite-2018" and r["ok"]
    assert r["timings_us"] == {"warmup_avg": 83235.0, "init": 38467.0, "inference_avg": 79760.9}
    r = parse("Average inference timings in us: Warmup: 83235, Init: 38467, no stats: 79760.9")
    assert r["timings_us"]["inference_avg"] == 79760.9 and r["ok"]


OP_PROFILE = (
    "Profiling Info for Benchmark Initialization:\n"
    "============================== Run Order ==============================\n"
    "\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t"
    "  [mem KB]\t[times called]\t[Name]\n"
    "\t ModifyGraphWithDelegate\t            0.000\t    1.190\t    1.190\t 94.896%\t 94.896%\t"
    "   732.000\t        1\tModifyGraphWithDelegate/0\n"
    "\t         AllocateTensors\t            1.192\t    0.064\t    0.064\t  5.104%\t100.000%\t"
    "     0.000\t        1\tAllocateTensors/0\n"
    "\n"
    "Timings (microseconds): count=1 curr=1254\n"
    "Memory (bytes): count=0\n"
    "2 nodes observed\n"
    "\n"
    "Operator-wise Profiling Info for Regular Benchmark Runs:\n"
    "============================== Run Order ==============================\n"
    "\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t"
    "  [mem KB]\t[times called]\t[Name]\n"
    "\t                 CONV_2D\t            0.000\t    0.071\t    0.066\t 61.111%\t 61.111%\t"
    "     0.000\t        1\t[model/conv1/BiasAdd;model/conv1/Conv2D]:0\n"
    "\t         FULLY_CONNECTED\t            0.067\t    0.045\t    0.042\t 38.889%\t100.000%\t"
    "     0.000\t        1\t[StatefulPartitionedCall:0]:1\n"
    "\n"
    "============================== Summary by node type ==============================\n"
    "\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t"
    "[times called]\n"
    "\t                 CONV_2D\t        1\t     0.066\t    61.111%\t    61.111%\t     0.000\t"
    "        1\n"
    "\t         FULLY_CONNECTED\t        1\t     0.042\t    38.889%\t   100.000%\t     0.000\t"
    "        1\n"
    "\n"
    "Timings (microseconds): count=50 first=116 curr=108 min=105 max=130 avg=108.3 std=4\n"
    "Memory (bytes): count=0\n"
    "2 nodes observed\n")


@pytest.mark.parametrize("prefix", ["", "INFO: ", "I tflite  : "])
def test_op_profiling_tables(prefix):
    text = "".join(prefix + line + "\n" for line in (MODERN.replace("INFO: ", "")
                                                     + OP_PROFILE).splitlines())
    r = parse(text)
    init = r["op_profiling"]["init"]["run_order"]
    assert [row["node_type"] for row in init] == ["ModifyGraphWithDelegate", "AllocateTensors"]
    assert init[0] == {"node_type": "ModifyGraphWithDelegate", "start": 0.0, "first": 1.19,
                       "avg_ms": 1.19, "pct": 94.896, "cdf_pct": 94.896, "mem_kb": 732.0,
                       "times_called": 1, "name": "ModifyGraphWithDelegate/0"}
    runs = r["op_profiling"]["runs"]
    assert runs["run_order"][0]["name"] == "[model/conv1/BiasAdd;model/conv1/Conv2D]:0"
    assert [(s["node_type"], s["count"], s["avg_ms"]) for s in runs["summary_by_node_type"]] == [
        ("CONV_2D", 1, 0.066), ("FULLY_CONNECTED", 1, 0.042)]
    # The profiler's own "Timings (microseconds): count=..." lines are not benchmark runs.
    assert r["inference"]["count"] == 50 and r["inference"]["avg"] == 116066
    assert r["ok"]


def test_errors_and_benchmarking_failed():
    r = parse("INFO: Loaded model /data/local/tmp/m.tflite\n"
              "ERROR: Didn't find op for builtin opcode 'CONV_2D' version '6'\n"
              "ERROR: Registration failed.\n"
              "Failed to initialize the interpreter\n"
              "Benchmarking failed.\n")
    assert r["failed"] and not r["ok"]
    assert r["errors"] == ["Didn't find op for builtin opcode 'CONV_2D' version '6'",
                           "Registration failed."]
    logcat = parse("E tflite  : Failed to apply NNAPI delegate.\nE tflite  : Benchmarking failed.\n")
    assert logcat["failed"] and logcat["delegate_failures"] == ["NNAPI"]
    assert logcat["errors"] == ["Failed to apply NNAPI delegate.", "Benchmarking failed."]


def test_failed_delegate_without_error_prefix():
    r = parse("Failed to apply NNAPI delegate.\nBenchmarking failed.\n")
    assert r["delegate_failures"] == ["NNAPI"] and r["failed"]


# ------------------------------------------------------------------ real outputs, as quoted
# tests/benchmark_outputs/README.md says where each file comes from.
FIXTURES = pathlib.Path(__file__).parent / "benchmark_outputs"


def _read(name):
    return (FIXTURES / name).read_text(encoding="utf-8")


def _run(stem):
    """A captured run: stderr then stdout, as a terminal shows them."""
    return _read(f"{stem}.stderr.txt") + _read(f"{stem}.stdout.txt")


ARM_SME2 = "benchmark_model_litert2_arm_learning_paths_litert_sme_4_benchmark.txt"
MLCOMMONS = "benchmark_model_litert2_mlcommons_mobile_app_open_issue_1134.txt"
LITERT_README = "benchmark_model_litert2_litert_tools_readme_output_format.txt"
PY_README = "litert_benchmark_litert_python_tools_readme_output_format.txt"
SINE = "litert_benchmark_sine_float_this_machine"
RESNET8 = "litert_benchmark_resnet8_int8_this_machine"
NOT_A_MODEL = "litert_benchmark_not_a_model_this_machine"


def test_litert2_benchmark_model_with_memory_block_and_profile_arm_learning_path():
    r = parse(_read(ARM_SME2))
    assert r["format"] == "litert2" and r["ok"] and not r["errors"]
    assert r["model_size_mb"] == 3.27774 and r["init_ms"] == 4.478
    # Its count= lines keep whole microseconds; its summary block rounds to 0.01 ms.
    assert r["inference"] == {"count": 2112, "first": 463, "curr": 459, "min": 442, "max": 979,
                              "avg": 464.545, "std": 13, "p5": 460, "median": 462, "p95": 478}
    assert r["warmup"]["count"] == 1055 and r["warmup"]["median"] == 463
    assert r["timings_us"] == {"init": 4480.0, "first_inference": 1030.0, "warmup_avg": 470.0,
                               "inference_avg": 460.0, "inference_min": 440.0,
                               "inference_max": 980.0, "inference_std": 10.0}
    assert r["resolution_us"] == 10.0
    assert r["memory_mb"] == {"kind": "footprint", "init": 8.94, "overall": 11.51, "peak": None}
    assert r["litert"]["throughput"] == 525.55 and r["litert"]["inference_avg_runs"] == 2112
    assert r["litert"]["warmup_avg_runs"] == 1055
    runs = r["op_profiling"]["runs"]
    assert [len(runs[t]) for t in ("run_order", "top_by_computation_time",
                                   "summary_by_node_type")] == [5, 5, 5]
    assert runs["run_order"][3] == {
        "node_type": "Fully Connected (NC, PF32) GEMM", "first": 0.538, "avg_ms": 0.382,
        "pct": 92.948, "cdf_pct": 97.018, "mem_kb": 0.0, "times_called": 1,
        "name": "Delegate/Fully Connected (NC, PF32) GEMM:1"}
    assert runs["summary_by_node_type"][0] == {
        "node_type": "Fully Connected (NC, PF32) GEMM", "count": 1, "avg_ms": 0.382,
        "avg_pct": 93.171, "cdf_pct": 93.171, "mem_kb": 0.0, "times_called": 1}
    # The profiler's "Timings (microseconds): count=3166" line is not a benchmark run.
    assert r["inference"]["count"] == 2112


def test_litert2_gpu_run_with_signature_mlcommons_issue_1134():
    r = parse(_read(MLCOMMONS))
    assert r["format"] == "litert2" and r["ok"]
    assert r["litert"]["signature_name"] == "prefill_1024"
    assert r["timings_us"] == {"init": 23744730.0, "first_inference": 7441040.0,
                               "warmup_avg": 7441040.0, "inference_avg": 7430200.0,
                               "inference_min": 7416400.0, "inference_max": 7448860.0,
                               "inference_std": 9920.0}
    assert (r["litert"]["warmup_avg_runs"], r["litert"]["inference_avg_runs"]) == (1, 10)
    assert r["litert"]["throughput"] == 27.46
    assert r["memory_mb"] == {"kind": "footprint", "init": 6391.74, "overall": 6391.74,
                              "peak": None}


# Both READMEs show the same example run; the Python tool's adds median, p5 and p95.
DOCUMENTED_US = {"init": 45320.0, "first_inference": 120450.0, "warmup_avg": 98760.0,
                 "inference_avg": 85230.0, "inference_min": 82100.0, "inference_max": 92450.0,
                 "inference_std": 3210.0}


def test_litert2_documented_format_with_peak_memory_and_first_inference():
    r = parse(_read(LITERT_README))
    assert r["format"] == "litert2" and r["ok"]
    assert r["timings_us"] == DOCUMENTED_US
    assert r["memory_mb"] == {"kind": "footprint", "init": 25.6, "overall": 32.4, "peak": 35.2}


def test_litert_benchmark_documented_format():
    r = parse(_read(PY_README))
    assert r["format"] == "litert-benchmark" and r["ok"]
    assert r["timings_us"] == {**DOCUMENTED_US, "inference_median": 84500.0,
                               "inference_p5": 82500.0, "inference_p95": 91000.0}
    assert r["litert"]["fully_accelerated"] is True and r["litert"]["throughput"] == 12.45
    assert (r["litert"]["warmup_avg_runs"], r["litert"]["inference_avg_runs"]) == (5, 50)


RESNET8_US = {"init": 1210.0, "first_inference": 320.0, "warmup_avg": 160.0,
              "inference_avg": 220.0, "inference_min": 130.0, "inference_max": 4290.0,
              "inference_median": 130.0, "inference_std": 580.0, "inference_p5": 130.0,
              "inference_p95": 180.0}
SINE_US = {"init": 5070.0, "first_inference": 50.0, "warmup_avg": 30.0, "inference_avg": 0.0,
           "inference_min": 0.0, "inference_max": 10.0, "inference_median": 0.0,
           "inference_std": 0.0, "inference_p5": 0.0, "inference_p95": 0.0}


@pytest.mark.parametrize("stem, expected, fully, runs, throughput", [
    (RESNET8, RESNET8_US, False, (10, 100), 13.29),
    (SINE, SINE_US, True, (2, 20), 1.58)])
def test_litert_benchmark_run_captured_here_text_and_json_agree(stem, expected, fully, runs,
                                                                 throughput):
    text = parse(_run(stem))
    # Its stderr warns (no NPU, no OpenVINO): warnings are not errors.
    assert text["format"] == "litert-benchmark" and text["ok"] and not text["errors"]
    assert text["timings_us"] == expected and text["resolution_us"] == 10.0
    assert text["litert"]["fully_accelerated"] is fully
    assert (text["litert"]["warmup_avg_runs"], text["litert"]["inference_avg_runs"]) == runs
    assert text["litert"]["throughput"] == throughput
    for source in (str(FIXTURES / f"{stem}.json"), _read(f"{stem}.json"),
                   json.loads(_read(f"{stem}.json"))):
        data = parse_result_json(source)
        assert data["format"] == "litert-benchmark-json" and data["ok"]
        # The file holds exactly what the text says: neither is finer than 0.01 ms.
        assert data["timings_us"] == text["timings_us"] and data["resolution_us"] == 10.0
        assert data["litert"]["fully_accelerated"] is fully
        assert (data["litert"]["warmup_avg_runs"], data["litert"]["inference_avg_runs"]) == runs
        assert data["litert"]["throughput"] == throughput
        assert data["litert"]["accelerators"] == ["CPU"] and data["litert"]["num_threads"] == 1
    assert parse(_read(f"{stem}.json"))["timings_us"] == expected  # parse() reads JSON too


def test_sub_resolution_model_reads_zero_captured_here():
    r = parse(_run(SINE))
    assert r["timings_us"]["inference_median"] == 0.0 and r["resolution_us"] == 10.0


def test_litert_benchmark_failure_captured_here():
    r = parse(_run(NOT_A_MODEL))
    assert r["failed"] and not r["ok"] and r["format"] == "unknown"
    assert r["errors"] == ["Model provided has model identifier 'a fl', should be 'TFL3'",
                           "RuntimeError: Failed to load model from file"]


def _indented(text):
    return "".join("    " + line for line in text.splitlines(keepends=True))


def _crlf(text):
    return text.replace("\n", "\r\n")


def _coloured(text):
    # As a terminal colours a log: the level word green/red, a reset at each line's end.
    coloured = re.sub(r"(?m)^(INFO|WARNING|ERROR|VERBOSE)",
                      lambda m: f"\x1b[1;3{1 if m.group(1) == 'ERROR' else 2}m{m.group(1)}\x1b[0m",
                      text)
    return coloured.replace("\n", "\x1b[0m\n")


def _ci(text):
    # A GitHub Actions log: every line after an ISO timestamp.
    return "".join(f"2026-11-30T10:04:{i % 60:02d}.1234567Z {line}"
                   for i, line in enumerate(text.splitlines(keepends=True)))


PASTED = {"indented": _indented, "crlf": _crlf, "ansi": _coloured, "ci_timestamps": _ci,
          "all_at_once": lambda t: _crlf(_coloured(_indented(t)))}
REAL = {"tensorflow_61946": MODERN, "arm_sme2": _read(ARM_SME2), "mlcommons": _read(MLCOMMONS),
        "litert_readme": _read(LITERT_README), "python_readme": _read(PY_README),
        "resnet8_here": _run(RESNET8), "sine_here": _run(SINE),
        "not_a_model_here": _run(NOT_A_MODEL)}


@pytest.mark.parametrize("how", PASTED)
@pytest.mark.parametrize("name", REAL)
def test_real_outputs_pasted_read_the_same(name, how):
    assert parse(PASTED[how](REAL[name])) == parse(REAL[name])


def test_result_json_bad_input(tmp_path):
    with pytest.raises(InputError, match=r"^litert-benchmark result file not found\. "
                                         r"Received: path='.*missing\.json'$"):
        parse_result_json(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"^litert-benchmark --result_json output must be JSON "
                                         r"\(.+\)\. Received: .*bad\.json starting '\{not json'$"):
        parse_result_json(str(bad))
    with pytest.raises(InputError, match=r"holds a 'latency' object; this one does not\. "
                                         r"Received: keys=\['model'\]$"):
        parse_result_json('{"model": "m.tflite"}')


def test_no_inference_runs_is_not_ok():
    r = parse("Inference (avg):      0.00 ms (0 runs)\nNo inference runs were performed.\n")
    assert not r["ok"]


def test_empty_output_is_not_ok():
    r = parse("")
    assert not r["ok"] and r["format"] == "unknown"
