"""tflite_ext.bench.host: real LiteRT timing, XNNPACK switch, accuracy; the CLI `bench`."""
import json

import keras
import numpy as np
import pytest

from tflite_ext import convert, models, tasks
from tflite_ext.bench import host, report
from tflite_ext.errors import InputError, ModelFileError


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


def test_bad_inputs(trained, tmp_path):
    s = trained["split"]
    with pytest.raises(ModelFileError, match=r"^Model file not found"):
        host.time_model(str(tmp_path / "missing.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelFileError, match=r"^LiteRT cannot load the model"):
        host.time_model(str(junk))
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
        "--task=digits", "--json", f"--out_dir={out}"])
    assert bench.main(fv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["latency"]) == 2 and printed["samples"] == 540
    assert json.loads((out / "bench.json").read_text()) == printed
    assert "| threads | XNNPACK |" in (out / "bench.md").read_text()


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
