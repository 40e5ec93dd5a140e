"""`tflite-ext demo --quick`: the pipeline runs end to end and writes whole, verified outputs."""
import json

import pytest

from conftest import assert_no_partial_files
from tflite_ext import demo, inspect, models
from tflite_ext.errors import InputError


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run(out_dir=str(out), quick=True, log=lambda *a: None)


def test_quick_demo_writes_verified_int8_model_and_reports(quick_report):
    out, report = quick_report
    assert json.loads((out / "report.json").read_text())["variants"] == report["variants"]
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["float32", "int8_ptq", "int8_qat", "int8_pruned",
                              "int8_pruned_factorized_qat", "int8_pruned_qat_cluster",
                              "int8_pruned_qat"]
    final = inspect.summary(out / "model.tflite")
    assert final["full_integer"], final["float_ops"]
    assert report["model_tflite"] == list(variants)[-1]
    assert final["size_bytes"] == variants[report["model_tflite"]]["bytes"]
    int8 = variants["int8_ptq"]
    assert int8["full_integer"] and not variants["float32"]["full_integer"]
    # Int8 quantization costs at most a point of accuracy (issue 2's bar), even in quick mode.
    assert int8["tflite_accuracy"] >= int8["keras_accuracy"] - 0.01
    assert int8["keras_accuracy"] > 0.9
    assert int8["bytes"] < variants["float32"]["bytes"] / 3.5
    assert all(v["median_us"] > 0 for v in variants.values())
    qat = variants["int8_qat"]
    assert qat["full_integer"] and qat["bytes"] < int8["bytes"]  # no calibration tensors left
    assert qat["tflite_accuracy"] >= qat["keras_accuracy"] - 0.01
    pruned = variants["int8_pruned_qat"]
    assert pruned["full_integer"] and pruned["bytes"] < int8["bytes"] / 8
    assert pruned["macs"] < int8["macs"] / 8
    factorized = variants["int8_pruned_factorized_qat"]
    assert factorized["full_integer"] and factorized["macs"] < pruned["macs"]
    assert factorized["bytes"] < pruned["bytes"]
    assert report["model_tflite"] == "int8_pruned_qat"
    for plot in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    worst = report["quantization_error"]["worst"]
    assert worst and set(worst) <= {layer.name for layer in models.digits_cnn().layers}
    md = (out / "report.md").read_text()
    assert "| int8_ptq |" in md and "Quick mode" in md and "loses precision" in md
    assert_no_partial_files(out)


def test_cluster_stage_writes_a_verified_lut_copy(quick_report):
    out, report = quick_report
    lut = report["lut"]
    small = inspect.summary(out / "model.lut.tflite")
    assert lut["bytes"] == small["size_bytes"] < lut["bytes_before"]
    by_name = {v["name"]: v for v in report["variants"]}
    assert lut["bytes_before"] == by_name["int8_pruned_qat_cluster"]["bytes"]
    assert lut["verified"]["identical"] and lut["verified"]["samples"] == 540
    assert [t["bits"] for t in small["compressed"]] == [2, 2, 3]   # conv2, conv3, fc1
    assert demo.plan(["cluster"]) == ["train", "prune", "cluster", "evaluate", "report"]


def test_stage_plan_adds_dependencies_and_rejects_unknown():
    assert demo.plan(["ptq"]) == ["train", "ptq", "evaluate", "report"]
    assert demo.plan(["qat"]) == ["train", "qat", "evaluate", "report"]
    assert demo.plan(["prune_qat"]) == ["train", "prune", "prune_qat", "evaluate", "report"]
    assert demo.plan(["factorize"]) == ["train", "prune", "factorize", "evaluate", "report"]
    with pytest.raises(InputError, match="Unknown demo stage.*nope"):
        demo.plan(["nope"])
