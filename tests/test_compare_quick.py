"""Smoke test of tools/compare.py --quick: every variant runs, is measured and reported.

The tool runs as a real subprocess (it launches its own tf_keras/tfmot subprocess too), with
real conversion and LiteRT. Accuracy/size/speed targets are the tool's job, not this test's:
here only the numbers that must hold for any budget are asserted.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare.py"),
                           "--model", "digits_cnn", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "compare.json") as f:
        return out, json.load(f), proc.stdout


def test_every_variant_is_measured(quick_run):
    out, result, stdout = quick_run
    rows = {r["variant"]: r for r in result["rows"]}
    assert {"float32", "PTQ int8", "tfmot prune 80% + strip → int8",
            "tfmot QAT → int8", "tfmot cluster 16 → strip → int8",
            "tflite_ext prune → strip → QAT + cluster → int8 LUT (TFLM)"} <= set(rows)
    for row in rows.values():
        assert os.path.getsize(out / row["file"]) == row["bytes"]
        assert 0 < row["gzip_bytes"] < row["bytes"] + 100
        assert 0.0 <= row["accuracy"] <= 1.0 and row["macs"] > 0
        # A TFLM LUT file has no LiteRT latency (LiteRT has no TFLM_DECODE kernel).
        if row.get("runtime") == "TFLM":
            assert row["median_us"] is None
            assert row["identical_samples"] == row["test_samples"]
        else:
            assert row["median_us"] > 0
        assert row["full_integer"] == (row["variant"] != "float32")
    # Unstructured pruning keeps every MAC; the reports agree with the files on disk.
    assert rows["tfmot prune 80% + strip → int8"]["macs"] == rows["PTQ int8"]["macs"]
    assert (out / "compare.md").read_text().count("\n|") >= len(rows) + 1
    assert "| PTQ int8 |" in stdout


def test_tfmot_peer_loaded_the_same_float_model(quick_run):
    _, result, _ = quick_run
    peer = result["tfmot"]
    assert peer["float_max_abs_logit_diff"] <= 1e-4
    assert peer["variants"]["tfmot_prune80"]["kernel_sparsity"] == pytest.approx(0.8, abs=0.01)


def test_structured_pruning_removes_channels(quick_run):
    _, result, _ = quick_run
    rows = {r["variant"]: r for r in result["rows"]}
    pruned = rows.get("tflite_ext structured prune + strip → int8")
    if pruned is None:
        pytest.skip("tflite_ext.pruning not available")
    assert pruned["bytes"] < rows["PTQ int8"]["bytes"] / 4
    assert pruned["macs"] < rows["PTQ int8"]["macs"] / 4


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "flag --model=nope: value should be one of <digits_cnn|resnet8>"),
    (["--skip-tfmot"], "Unknown command line flag 'skip-tfmot'. Did you mean: skip_tfmot ?"),
])
def test_bad_flag_is_one_line_and_writes_nothing(tmp_path, args, message):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare.py"), *args,
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr.splitlines()[0]
    assert not (tmp_path / "out").exists()
