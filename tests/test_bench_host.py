"""tflite_ext.bench.host: real LiteRT timing (own loop and litert-benchmark), XNNPACK switch,
accuracy; the CLI `bench`."""
import json
import os

import keras
import numpy as np
import pytest

from tflite_ext import convert, models, tasks
from tflite_ext.bench import host, report
from tflite_ext.errors import BenchmarkFailed, InputError, ModelFileError, RunTimeout


def _tiny_cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CNN trained 8 epochs on the digits, converted to float32 and full int8."""
    keras.utils.set_random_seed(0)
    split = tasks.digits()
    model = _tiny_cnn()
    models.compile_classifier(model, 1e-2)
    model.fit(split.x_train, split.y_train, epochs=8, batch_size=32, verbose=0)
    keras_acc = model.evaluate(split.x_test, split.y_test, verbose=0)[1]
    folder = tmp_path_factory.mktemp("host")
    int8 = convert.to_tflite(model, split.x_train[:200]).save(str(folder / "int8.tflite"))
    f32 = convert.to_tflite(model, mode="float32").save(str(folder / "f32.tflite"))
    return {"split": split, "int8": int8, "f32": f32, "keras_acc": keras_acc,
            "folder": folder}


def test_time_model_statistics_are_ordered(trained):
    r = host.time_model(trained["int8"], runs=30, warmup=3)
    assert r["runs"] == 30 and r["warmup"] == 3 and r["num_threads"] == 1 and r["xnnpack"]
    assert 0 < r["min_us"] <= r["median_us"] <= r["p90_us"] <= r["max_us"]


def test_thread_sweep_and_xnnpack_off(trained):
    rows = host.thread_sweep(trained["int8"], threads=(1, 2), xnnpack=(True, False), runs=10,
                             warmup=1)
    assert [(r["num_threads"], r["xnnpack"]) for r in rows] == [
        (1, True), (1, False), (2, True), (2, False)]


def test_xnnpack_off_uses_builtin_resolver_without_delegates(trained):
    # With XNNPACK applied, the float model's ops are replaced by one delegate node.
    on = host.load_interpreter(trained["f32"], xnnpack=True)
    off = host.load_interpreter(trained["f32"], xnnpack=False)
    ops_on = {op["op_name"] for op in on._get_ops_details()}
    ops_off = {op["op_name"] for op in off._get_ops_details()}
    assert "DELEGATE" in ops_on and "DELEGATE" not in ops_off
    assert "CONV_2D" in ops_off


def test_evaluate_int8_and_float_match_keras(trained):
    s = trained["split"]
    f32 = host.evaluate(trained["f32"], s.x_test, s.y_test)
    int8 = host.evaluate(trained["int8"], s.x_test, s.y_test)
    assert f32["samples"] == len(s.y_test) == 540
    # float32 tflite is the same math as Keras: same accuracy within one sample.
    assert abs(f32["accuracy"] - trained["keras_acc"]) <= 1 / 540 + 1e-9
    assert f32["accuracy"] > 0.8
    assert abs(int8["accuracy"] - f32["accuracy"]) <= 0.02


def test_predict_dequantizes_with_model_parameters(trained):
    s = trained["split"]
    out_f32 = host.predict(trained["f32"], s.x_test[:50])
    out_int8 = host.predict(trained["int8"], s.x_test[:50])
    scale = host.describe(trained["int8"])["outputs"][0]["scale"]
    # int8 logits are float logits up to quantization error (a few output steps).
    assert np.max(np.abs(out_f32 - out_int8)) < 12 * scale + 0.05 * np.abs(out_f32).max()


def test_time_interleaved_returns_a_median_per_variant(trained):
    medians = host.time_interleaved({"float32": trained["f32"], "int8": trained["int8"]},
                                    trained["split"].x_test[:20], runs=20, warmup=2)
    assert set(medians) == {"float32", "int8"} and all(v > 0 for v in medians.values())


def test_reference_kernels_in_cpu_time(trained):
    """The reference kernels are plain loops: far slower than XNNPACK's int8 kernels, on a
    model with enough arithmetic to show it (a 32x32 conv stack: 3.5 M MACs; on the 8x8
    digits CNN the per-call overhead hides the kernels and the ratio fell to 1.3 in the
    full suite)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c2")(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    x_cal = np.random.default_rng(0).random((50, 32, 32, 3), np.float32)
    models = {"conv": convert.to_tflite(keras.Model(inputs, outputs), x_cal).flatbuffer}
    fast = host.time_interleaved(models, x_cal[:5], runs=20, warmup=2, cpu_time=True)["conv"]
    slow = host.time_interleaved(models, x_cal[:5], runs=20, warmup=2, reference=True,
                                 cpu_time=True)["conv"]
    assert slow > 3 * fast > 0
    with pytest.raises(InputError, match="cpu_time measures one thread"):
        host.time_interleaved(models, x_cal[:5], runs=1, num_threads=2, cpu_time=True)


def test_bad_inputs(trained, tmp_path):
    s = trained["split"]
    with pytest.raises(ModelFileError, match=r"^Model file not found"):
        host.time_model(str(tmp_path / "missing.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelFileError, match=r"^Not a TFLite flatbuffer \(expected the 'TFL3' "):
        host.time_model(str(junk))  # refused before LiteRT sees it
    with pytest.raises(InputError, match=r"^Samples must have shape \(N, 8, 8, 1\) to match the "
                                         r"model input\. Received: shape=\(5, 8, 8\)$"):
        host.evaluate(trained["int8"], s.x_test[:5, ..., 0], s.y_test[:5])
    with pytest.raises(InputError, match=r"^x and y must have the same length"):
        host.evaluate(trained["int8"], s.x_test[:5], s.y_test[:4])
    with pytest.raises(InputError, match=r"^num_threads must be >= 1"):
        host.time_model(trained["int8"], num_threads=0)


def test_cli_bench_json_and_reports(trained, capsys):
    from absl import flags
    from tflite_ext.bench.commands import COMMANDS
    bench = {c.name: c for c in COMMANDS}["bench"]
    fv = flags.FlagValues()
    bench.define_flags(fv)
    out = trained["folder"] / "reports"
    fv(["bench", f"--model={trained['int8']}", "--threads=1,2", "--runs=5", "--warmup=1",
        "--task=digits", "--json", f"--out_dir={out}", "--timer=own"])
    assert bench.main(fv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["latency"]) == 2 and printed["samples"] == 540
    assert json.loads((out / "bench.json").read_text()) == printed
    assert "| threads | XNNPACK |" in (out / "bench.md").read_text()


def test_litert_benchmark_times_the_model_for_real(trained):
    r = host.time_litert_benchmark(trained["int8"], runs=5, warmup=1)
    assert r["timer"] == "litert-benchmark" and r["runs"] == 5 and r["warmup"] == 1
    assert r["num_threads"] == 1 and r["xnnpack"] and r["accelerators"] == ["CPU"]
    assert r["resolution_us"] == 10.0 and isinstance(r["fully_accelerated"], bool)
    # Its numbers are whole 0.01 ms steps, in order.
    steps = [r[k] / 10.0 for k in ("min_us", "p5_us", "median_us", "p95_us", "max_us")]
    assert all(abs(v - round(v)) < 1e-9 for v in steps) and steps == sorted(steps)
    assert r["command"].endswith(f"--model={trained['int8']} --num_runs=5 --warmup_runs=1 "
                                 "--num_threads=1 --result_json=RESULT.json")
    if r["mean_from_throughput_us"] is not None:  # finer than, and within, the printed mean
        assert r["mean_from_throughput_error_us"] < 5.0
        assert abs(r["mean_from_throughput_us"] - r["mean_us"]) <= 5.0 + \
            r["mean_from_throughput_error_us"]
    from_bytes = host.time_litert_benchmark(open(trained["int8"], "rb").read(), runs=2, warmup=0)
    assert "--model=MODEL.tflite " in from_bytes["command"]


def test_thread_sweep_with_both_timers_skips_litert_without_xnnpack(trained):
    rows = host.thread_sweep(trained["int8"], threads=(1,), xnnpack=(True, False), runs=3,
                             warmup=0, timers=("own", "litert"))
    assert [(r["num_threads"], r["xnnpack"]) for r in rows] == [(1, True), (1, False)]
    assert rows[0]["median_us"] > 0 and rows[0]["litert"]["timer"] == "litert-benchmark"
    assert rows[1]["litert"] == {"skipped": "litert-benchmark always runs XNNPACK"}
    only = host.thread_sweep(trained["int8"], (1,), (True,), runs=2, warmup=0, timers=("litert",))
    assert "median_us" not in only[0] and only[0]["litert"]["runs"] == 2
    with pytest.raises(InputError, match=r"^timers must be 'own' and/or 'litert'\. "
                                         r"Received: timers=\('own', 'tflm'\)$"):
        host.thread_sweep(trained["int8"], timers=("own", "tflm"))


def _program(tmp_path, body):
    path = tmp_path / "fake-litert-benchmark"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_litert_benchmark_bad_inputs(trained, tmp_path, monkeypatch):
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer")
    # Refused before the program runs (its own failures are reported below).
    with pytest.raises(ModelFileError, match=r"^Not a TFLite flatbuffer \(expected the 'TFL3' "
                                             r"identifier at byte 4, found b'a fl'\)\. "
                                             r"Received: .*junk\.tflite$"):
        host.time_litert_benchmark(str(junk), runs=1, warmup=0)
    with pytest.raises(ModelFileError, match=r"^Model file not found"):
        host.time_litert_benchmark(str(tmp_path / "missing.tflite"))
    with pytest.raises(InputError, match=r"^litert-benchmark program not found or not "
                                         r"executable: .* Received: program='/no/such/tool'$"):
        host.time_litert_benchmark(trained["int8"], program="/no/such/tool")
    failing = _program(tmp_path, 'echo "ERROR: [tool.cc:1] boom" >&2; exit 3')
    with pytest.raises(BenchmarkFailed, match=r"^litert-benchmark failed \(exit 3: boom\)\. "):
        host.time_litert_benchmark(trained["int8"], program=failing)
    silent = _program(tmp_path, "exit 0")
    with pytest.raises(BenchmarkFailed, match=r"^litert-benchmark failed \(exit 0: no output\)"):
        host.time_litert_benchmark(trained["int8"], program=silent)
    hung = _program(tmp_path, "sleep 10")
    with pytest.raises(RunTimeout, match=r"^litert-benchmark did not finish in 0\.5 s"):
        host.time_litert_benchmark(trained["int8"], program=hung, timeout=0.5)
    # Neither the console script nor its module: say what to install.
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"^litert-benchmark not found: install "
                                         r"ai-edge-litert>=2\.3 .* Received: program=None$"):
        host.time_litert_benchmark(trained["int8"])


def _bench(argv):
    from absl import flags
    from tflite_ext.bench.commands import COMMANDS
    bench = {c.name: c for c in COMMANDS}["bench"]
    fv = flags.FlagValues()
    bench.define_flags(fv)
    fv(["bench", *argv])
    return bench.main(fv)


def test_cli_bench_both_timers_side_by_side(trained, capsys):
    # The default timer is both.
    assert _bench([f"--model={trained['int8']}", "--runs=3", "--warmup=0", "--xnnpack=both"]) == 0
    text = capsys.readouterr().out
    assert ("| threads | XNNPACK | median µs (own) | median µs (litert-benchmark) | "
            "mean µs (own) | mean µs (litert-benchmark) |") in text
    assert f"CPU: {host.describe_cpu()}, {os.cpu_count()} logical CPUs" in text
    assert "n/a (always XNNPACK)" in text and "multiple of 10 µs" in text
    litert_cell = text.split("\n| 1 | True | ")[1].split(" | ")[1]
    assert litert_cell == "< 5" or litert_cell.endswith(" ±5")
    assert _bench([f"--model={trained['int8']}", "--runs=3", "--warmup=0", "--timer=litert",
                   "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["timers"] == ["litert"] and printed["cpu"] == host.describe_cpu()
    assert printed["latency"][0]["litert"]["runs"] == 3 and "median_us" not in printed["latency"][0]


def test_cli_bench_timer_errors(trained, tmp_path):
    with pytest.raises(InputError, match=r"^--timer=litert cannot time --xnnpack=off: "
                                         r"litert-benchmark always runs XNNPACK"):
        _bench([f"--model={trained['int8']}", "--timer=litert", "--xnnpack=off"])
    with pytest.raises(InputError, match=r"^litert-benchmark program not found"):
        _bench([f"--model={trained['int8']}", f"--litert_benchmark={tmp_path / 'none'}"])


def test_cli_bench_requires_model():
    from absl import flags
    from tflite_ext.bench.commands import COMMANDS
    bench = {c.name: c for c in COMMANDS}["bench"]
    fv = flags.FlagValues()
    bench.define_flags(fv)
    fv(["bench"])
    with pytest.raises(InputError, match=r"^--model is required"):
        bench.main(fv)


def test_plots_and_markdown(tmp_path):
    variants = [{"name": "float32", "accuracy": 0.998, "size_bytes": 1034676, "latency_us": 164.5},
                {"name": "int8", "accuracy": 0.998, "size_bytes": 277968, "latency_us": 173.7},
                {"name": "pruned int8", "accuracy": 0.99, "size_bytes": 90000}]
    paths = report.plot_variants(variants, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy_vs_size.png",
                                                    "accuracy_vs_latency.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["accuracy_vs_latency.png",
                                                          "accuracy_vs_size.png"]
    with pytest.raises(InputError, match=r"^Each variant needs name, accuracy and size_bytes\. "
                                         r"Received: 'x' without accuracy$"):
        report.plot_variants([{"name": "x", "size_bytes": 3}], str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    table = report.markdown_table([{"a": 1234567, "b": 0.5}], [("a", "A"), ("b", "B")])
    assert table == "| A | B |\n|---|---|\n| 1,234,567 | 0.5 |\n"
