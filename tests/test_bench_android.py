"""tflite_ext.bench.android: the real adb client where no device is needed, the documented
stand-in (tests/fake_adb/adb) for device paths, since no phone is attached here."""
import csv
import json
import os
import shutil
import socket
import subprocess

import pytest
import tflite_micro

from tflite_ext.bench import android
from tflite_ext.errors import DeviceError, InputError

FAKE_ADB = os.path.join(os.path.dirname(__file__), "fake_adb", "adb")
REAL_ADB = shutil.which("adb")
PROPS = {"ro.product.model": "Pixel 7", "ro.product.cpu.abi": "arm64-v8a",
         "ro.soc.model": "Tensor G2", "ro.board.platform": "gs201",
         "ro.build.version.release": "14", "ro.build.version.sdk": "34"}


# TFLM's example model (3 FULLY_CONNECTED, 3 KB), shipped in the tflite-micro package.
_SMALL_TFLITE = open(os.path.join(os.path.dirname(tflite_micro.__file__), "python",
                                  "tflite_micro", "sine_float.tflite"), "rb").read()


def _elf(path, machine=0xB7):
    """A file with a 64-bit little-endian ELF header for `machine` (0xB7 = AArch64)."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header))
    return str(path)


@pytest.fixture
def device(tmp_path):
    """A stand-in device; returns (adb, state dict, save function, model, binary, fake dir)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    state = {"devices": {"FAKE123": {"state": "device", "props": dict(PROPS)}}}

    def save():
        (fake / "state.json").write_text(json.dumps(state))

    save()
    os.environ["FAKE_ADB_DIR"] = str(fake)
    model = tmp_path / "digits_int8.tflite"
    model.write_bytes(_SMALL_TFLITE)  # a real flatbuffer: the android command checks it first
    binary = _elf(tmp_path / "benchmark_model")
    yield android.Adb(FAKE_ADB, timeout=20), state, save, str(model), binary, fake
    os.environ.pop("FAKE_ADB_DIR", None)


def _device_files(fake):
    root = fake / "fs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


# ---- real adb client, no device -------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_adb():
    if REAL_ADB is None:
        pytest.skip("Debian package adb is not installed")
    port = _free_port()            # a private adb server: no clash with anyone else's
    adb = android.Adb(REAL_ADB, server_port=port, timeout=30)
    yield adb
    subprocess.run([REAL_ADB, "-P", str(port), "kill-server"], capture_output=True, timeout=30)


def test_real_adb_starts_server_and_lists_no_device(real_adb):
    status, out = real_adb.run(["start-server"])
    assert status == 0
    assert real_adb.devices() == []
    with pytest.raises(DeviceError, match=r"^No Android device attached .*Received: devices=\[\]$"):
        android.select_devices(real_adb)


def test_real_adb_run_benchmark_without_device(real_adb, tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3" * 10)
    with pytest.raises(DeviceError, match="No Android device attached"):
        android.run_benchmark(str(model), _elf(tmp_path / "benchmark_model"), adb=real_adb)


def test_adb_not_installed(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(android.ADB_ENV, raising=False)
    with pytest.raises(DeviceError, match=r"^adb not found: install the Debian package `adb`.*"
                                          r"Received: adb='adb'$"):
        android.Adb()
    with pytest.raises(DeviceError, match="adb not found"):
        android.Adb("/opt/nowhere/adb")


def test_adb_path_from_environment(monkeypatch):
    monkeypatch.setenv(android.ADB_ENV, FAKE_ADB)
    assert android.Adb().path == FAKE_ADB


# ---- stand-in device ------------------------------------------------------------------------

def test_devices_states_and_facts(device):
    adb, state, save, *_ = device
    state["devices"]["OFF1"] = {"state": "offline"}
    state["devices"]["UNAUTH1"] = {"state": "unauthorized"}
    save()
    assert [(d["serial"], d["state"]) for d in adb.devices()] == [
        ("FAKE123", "device"), ("OFF1", "offline"), ("UNAUTH1", "unauthorized")]
    assert android.device_facts(adb, "FAKE123") == {
        "serial": "FAKE123", "model": "Pixel 7", "abi": "arm64-v8a", "soc": "Tensor G2",
        "android": "14", "sdk": "34"}
    assert android.select_devices(adb, "FAKE123") == ["FAKE123"]
    with pytest.raises(DeviceError, match=r"^Device UNAUTH1 is unauthorized: .*"
                                          r"Received: state='unauthorized'$"):
        android.select_devices(adb, "UNAUTH1")
    with pytest.raises(DeviceError, match=r"^Device OFF1 is offline: .*Received: state='offline'$"):
        android.select_devices(adb, "OFF1")
    with pytest.raises(DeviceError, match="Device OFF1 is offline"):
        android.select_devices(adb)          # "all devices" needs all of them ready
    with pytest.raises(DeviceError, match=r"^Device NOPE is not attached"):
        android.select_devices(adb, "NOPE")


def test_soc_falls_back_to_board_platform(device):
    adb, state, save, *_ = device
    del state["devices"]["FAKE123"]["props"]["ro.soc.model"]
    save()
    assert android.device_facts(adb, "FAKE123")["soc"] == "gs201"


def test_run_benchmark_pushes_runs_parses_and_cleans_up(device):
    adb, state, save, model, binary, fake = device
    [r] = android.run_benchmark(model, binary, threads=4, delegate="xnnpack", warmup_runs=3,
                                num_runs=20, op_profiling=True, adb=adb)
    assert r["status"] == "ok" and r["device"]["model"] == "Pixel 7"
    assert r["timings_us"]["inference_avg"] == 1000.0      # the stand-in prints 4000/threads
    assert r["inference_stats_us"]["count"] == 20
    assert r["parsed"]["op_profiling"]["runs"]["run_order"][0]["node_type"] == "CONV_2D"
    log = (fake / "commands.log").read_text()
    assert "push" in log and "chmod 755 /data/local/tmp/benchmark_model" in log
    assert ("--graph=/data/local/tmp/digits_int8.tflite --num_threads=4 --use_xnnpack=true "
            "--warmup_runs=3 --num_runs=20 --enable_op_profiling=true") in log
    assert _device_files(fake) == []                          # cleanup removed what we pushed


def test_all_devices_when_no_serial(device):
    adb, state, save, model, binary, fake = device
    state["devices"]["FAKE456"] = {"state": "device", "props": dict(PROPS, **{
        "ro.product.model": "Galaxy S23"})}
    save()
    results = android.run_benchmark(model, binary, adb=adb, num_runs=5)
    assert [r["device"]["model"] for r in results] == ["Pixel 7", "Galaxy S23"]


def test_sweep_writes_json_csv_and_keeps_results_when_a_later_run_fails(device, tmp_path):
    adb, state, save, model, binary, fake = device
    state["rules"] = [{"match": "--num_threads=2 --use_gpu=true", "action": "benchmark_failed"},
                      {"match": "--num_threads=4", "action": "hang"}]
    save()
    out = tmp_path / "out"
    results, json_path, csv_path = android.sweep(
        model, binary, str(out), threads=(1, 2, 4), delegates=("cpu", "gpu"), num_runs=10,
        timeout=3, adb=adb)
    status = [(r["threads"], r["delegate"], r["status"]) for r in results]
    assert status == [(1, "cpu", "ok"), (1, "gpu", "ok"), (2, "cpu", "ok"), (2, "gpu", "failed"),
                      (4, "cpu", "failed"), (4, "gpu", "failed")]
    assert "Node number 3 (CONV_2D) failed to invoke" in results[3]["error"]
    assert "hung on FAKE123 (threads=4, delegate=cpu): no result within 3s" in results[4]["error"]
    saved = json.loads(open(json_path).read())
    assert [r["status"] for r in saved] == [s for _, _, s in status]
    rows = list(csv.DictReader(open(csv_path)))
    assert [float(r["inference_avg_us"]) for r in rows[:3]] == [4250.0, 4000.0, 2250.0]
    assert rows[0]["model"] == "Pixel 7" and rows[3]["status"] == "failed"
    assert sorted(os.listdir(out)) == ["android.csv", "android.json"]
    assert _device_files(fake) == []


def test_run_that_hangs_times_out(device):
    adb, state, save, model, binary, fake = device
    state["rules"] = [{"match": "--num_threads", "action": "hang"}]
    save()
    with pytest.raises(android.RunTimeout, match=r"^benchmark_model hung on FAKE123 "
                                                 r"\(threads=1, delegate=cpu\): no result within "
                                                 r"2s\. Received: timeout=2$"):
        android.run_benchmark(model, binary, adb=adb, timeout=2)
    assert "kill $(cat /data/local/tmp/tflite_ext_benchmark.pid)" in (
        fake / "commands.log").read_text()
    assert _device_files(fake) == []


def test_nnapi_delegate_failure(device):
    adb, state, save, model, binary, fake = device
    state["rules"] = [{"match": "--use_nnapi=true", "action": "nnapi_failed"}]
    save()
    with pytest.raises(android.BenchmarkFailed, match=r"^benchmark_model failed on FAKE123 "
                       r"\(threads=1, delegate=nnapi\): Failed to apply NNAPI delegate$"):
        android.run_benchmark(model, binary, delegate="nnapi", adb=adb)


def test_unauthorized_and_offline_device_errors(device):
    adb, state, save, model, binary, fake = device
    state["devices"]["FAKE123"]["state"] = "unauthorized"
    save()
    with pytest.raises(DeviceError, match=r"^Device FAKE123 is unauthorized"):
        android.run_benchmark(model, binary, adb=adb)
    state["devices"]["FAKE123"]["state"] = "offline"
    save()
    with pytest.raises(DeviceError, match=r"^Device FAKE123 is offline"):
        android.run_benchmark(model, binary, adb=adb)


def test_no_device_with_stand_in(device):
    adb, state, save, model, binary, fake = device
    state["devices"] = {}
    save()
    with pytest.raises(DeviceError, match="No Android device attached"):
        android.run_benchmark(model, binary, adb=adb)


def test_binary_missing_or_not_for_the_device(device, tmp_path):
    adb, state, save, model, binary, fake = device
    with pytest.raises(InputError, match=r"^benchmark_model binary not found\. "
                                         r"Received: binary='/nope/benchmark_model'$"):
        android.run_benchmark(model, "/nope/benchmark_model", adb=adb)
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(InputError, match=r"^benchmark_model binary is not an ELF executable"):
        android.run_benchmark(model, str(script), adb=adb)
    x86 = _elf(tmp_path / "bm_x86", machine=0x3E)
    with pytest.raises(DeviceError, match=r"^benchmark_model is built for x86_64 but device "
                                          r"FAKE123 is arm64-v8a"):
        android.run_benchmark(model, x86, adb=adb)
    assert _device_files(fake) == []


def test_binary_not_executable_on_device(device):
    adb, state, save, model, binary, fake = device
    state["chmod_has_no_effect"] = True
    save()
    with pytest.raises(DeviceError, match=r"^/data/local/tmp/benchmark_model is not executable "
                                          r"on FAKE123 after chmod"):
        android.run_benchmark(model, binary, adb=adb)
    assert _device_files(fake) == []


def test_push_failure(device):
    adb, state, save, model, binary, fake = device
    state["push_fails"] = True
    save()
    with pytest.raises(DeviceError, match=r"^adb push of digits_int8\.tflite to FAKE123 failed: "
                                          r"adb: error: failed to copy .*No space left on device$"):
        android.run_benchmark(model, binary, adb=adb)


def test_bad_delegate_and_threads(device):
    adb, state, save, model, binary, fake = device
    with pytest.raises(InputError, match=r"^delegate must be one of .*Received: delegate='tpu'$"):
        android.run_benchmark(model, binary, delegate="tpu", adb=adb)
    with pytest.raises(InputError, match=r"^threads must be >= 1"):
        android.sweep(model, binary, "/tmp/x", threads=(0,), adb=adb)


def test_cli_android_sweep_json(device, tmp_path, capsys):
    from absl import flags
    from tflite_ext.bench.commands import COMMANDS
    adb, state, save, model, binary, fake = device
    command = {c.name: c for c in COMMANDS}["android"]
    fv = flags.FlagValues()
    command.define_flags(fv)
    out = tmp_path / "report"
    fv(["android", f"--model={model}", f"--binary={binary}", "-s", "FAKE123", "--threads=1,4",
        "--delegates=cpu,xnnpack", "--num_runs=5", f"--adb={FAKE_ADB}", f"--out_dir={out}",
        "--json"])
    assert command.main(fv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["threads"], r["delegate"], r["timings_us"]["inference_avg"]) for r in printed] == [
        (1, "cpu", 4250.0), (1, "xnnpack", 4000.0), (4, "cpu", 1250.0), (4, "xnnpack", 1000.0)]
    # Each result once: the sweep's JSON and CSV, and the Markdown table.
    assert sorted(os.listdir(out)) == ["android.csv", "android.json", "android.md"]
    assert json.loads((out / "android.json").read_text()) == printed
    assert "| FAKE123 | Pixel 7 | Tensor G2 | 14 | 4 | xnnpack | ok | 1,000 |" in (
        out / "android.md").read_text()
