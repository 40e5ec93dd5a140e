"""The benchmark_model parser against the output variants quoted in references.md."""
import pytest

from tflite_ext.bench.benchmark_output import parse

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


LITERT2 = """\
INFO: [benchmark_litert_model.h:94] Model initialization: 23744.73 ms
INFO: [benchmark_litert_model.h:96] Warmup (first): 41.25 ms
INFO: [benchmark_litert_model.h:98] Warmup (avg): 41.25 ms (1 runs)
INFO: [benchmark_litert_model.h:100] Inference (avg): 12.5 ms (10 runs)
INFO: [benchmark_litert_model.h:101] Inference (min): 11.75 ms
INFO: [benchmark_litert_model.h:102] Inference (max): 14.5 ms
INFO: [benchmark_litert_model.h:103] Inference (std): 0.82
INFO: [benchmark_litert_model.h:106] Throughput: 256.3 MB/s
"""


def test_litert2_format():
    r = parse(LITERT2)
    assert r["format"] == "litert2" and r["ok"]
    assert r["timings_us"] == {"init": pytest.approx(23744730.0),
                               "first_inference": 41250.0, "warmup_avg": 41250.0,
                               "inference_avg": 12500.0, "inference_min": 11750.0,
                               "inference_max": 14500.0, "inference_std": 820.0}
    assert r["litert"]["inference_avg_runs"] == 10 and r["litert"]["throughput"] == 256.3
    assert r["litert"]["throughput_unit"] == "MB/s"


def test_empty_output_is_not_ok():
    r = parse("")
    assert not r["ok"] and r["format"] == "unknown"
