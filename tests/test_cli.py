"""The `tflite-ext` command: exit codes, one-line errors, and no partial output files."""
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import assert_no_partial_files
from test_convert import Sin, input_scales, qat_softmax_model, two_input_model
from tflite_ext import cli, inspect
from tflite_ext.quantization import quantize_model


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_files(trained_tiny, digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    trained_tiny.save(folder / "tiny.keras")
    np.save(folder / "calib.npy", digits.x_train[:100])
    return folder


def test_console_script_help_lists_commands():
    done = subprocess.run([sys.executable, "-m", "tflite_ext.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for name in ("demo", "convert", "inspect"):
        assert f"\n  {name} " in done.stdout


def test_command_help_and_usage_errors(capsys):
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "usage: tflite-ext convert MODEL [--flags]" in out and "--mode" in out
    assert run(capsys)[0] == 2
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and err.strip() == ("tflite-ext: error: unknown command 'frobnicate'; "
                                         "expected one of: " + ", ".join(cli._commands()))
    code, _, err = run(capsys, "inspect", "--bogus")
    assert code == 2 and "Unknown command line flag 'bogus'" in err


def test_convert_then_inspect(capsys, model_files, tmp_path):
    out_path = tmp_path / "tiny.tflite"
    code, out, err = run(capsys, "convert", str(model_files / "tiny.keras"),
                         "--data", str(model_files / "calib.npy"), "-o", str(out_path))
    assert code == 0, err
    assert "full integer: yes" in out and f"wrote {out_path}" in out
    code, out, _ = run(capsys, "inspect", str(out_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["full_integer"] and info["size_bytes"] == os.path.getsize(out_path)
    code, out, _ = run(capsys, "convert", str(model_files / "tiny.keras"), "--mode", "float16",
                       "-o", str(tmp_path / "f16.tflite"), "--json")
    assert code == 0 and json.loads(out)["mode"] == "float16"


def _write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing model", "Model path does not exist"),
    ("wrong shape", r"does not match model input .* \(N, 8, 8, 1\)"),
    ("wrong dtype", "dtype must be floating"),
    ("nan", "NaN/inf"),
    ("not npy", "Cannot read representative data as .npy/.npz"),
    ("missing data", "Representative data file not found"),
    ("no data", "needs representative_data"),
    ("npz with two arrays", r"keys \['x', 'y'\] do not match the model's inputs"),
    ("unwritable output", "Cannot create output folder"),
])
def test_convert_bad_input_exits_2_with_one_line_and_no_file(capsys, model_files, tmp_path,
                                                              case, message):
    model, data = str(model_files / "tiny.keras"), str(model_files / "calib.npy")
    x = np.load(data)
    output = tmp_path / "out" / "m.tflite"
    bad_arrays = {"wrong shape": x[:, :, :4], "wrong dtype": (x * 16).astype("int64"),
                  "nan": np.where(np.arange(x.size).reshape(x.shape) == 77, np.nan, x)}
    if case in bad_arrays:
        np.save(tmp_path / "d.npy", bad_arrays[case])
        data = str(tmp_path / "d.npy")
    elif case == "missing model":
        model = str(tmp_path / "missing.keras")
    elif case == "npz with two arrays":
        np.savez(tmp_path / "d.npz", x=x, y=x)
        data = str(tmp_path / "d.npz")
    elif case == "not npy":
        data = _write(tmp_path / "d.npy", b"1,2,3\n")
    elif case == "missing data":
        data = str(tmp_path / "none.npy")
    elif case == "unwritable output":
        (tmp_path / "a_file").write_text("x")
        output = tmp_path / "a_file" / "sub" / "m.tflite"  # a folder under a regular file
    argv = ["convert", model, "-o", str(output)]
    if case != "no data":
        argv += ["--data", data]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tflite-ext convert: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not output.exists()
    if output.parent.exists():
        assert_no_partial_files(output.parent)


@pytest.mark.parametrize("content, message", [
    (None, "Model file not found"),
    (b"", "empty"),
    (b"\x00" * 3, "Not a TFLite flatbuffer"),
    (b"PK\x03\x04 definitely a zip", "Not a TFLite flatbuffer"),
])
def test_inspect_bad_files(capsys, tmp_path, content, message):
    path = tmp_path / "m.tflite"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_inspect_truncated_file(capsys, tmp_path, tiny_int8):
    path = _write(tmp_path / "cut.tflite", tiny_int8.flatbuffer[:1500])
    code, _, err = run(capsys, "inspect", path)
    assert code == 2 and "truncated" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- issue 12

def _convert_cli(capsys, model, tmp_path, *flags):
    output = tmp_path / "m.tflite"
    code, out, err = run(capsys, "convert", str(model), "-o", str(output), *flags)
    return code, out, err, output


def test_convert_qat_softmax_keras_file_without_data(capsys, tmp_path):
    qat_softmax_model().save(tmp_path / "qat.keras")
    code, out, err, output = _convert_cli(capsys, tmp_path / "qat.keras", tmp_path)
    assert code == 0, err
    assert "full integer: yes" in out and "mode=int8, io=int8)" in out
    assert inspect.summary(str(output))["op_counts"]["SOFTMAX"] == 1


def test_convert_prints_the_io_types_the_file_has(capsys, tmp_path):
    # A float op after the QAT model's last range: the converter cannot give that output int8.
    qat = quantize_model(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    keras.Model(qat.inputs, Sin()(qat.outputs[0])).save(tmp_path / "qat_sin.keras")
    code, out, err, output = _convert_cli(capsys, tmp_path / "qat_sin.keras", tmp_path,
                                          "--allow_float", "SIN")
    assert code == 0, err
    info = inspect.summary(str(output))
    assert [t["dtype"] for t in info["inputs"] + info["outputs"]] == ["int8", "float32"]
    assert out.strip().splitlines()[-1] == (f"wrote {output} ({os.path.getsize(output):,} "
                                            f"bytes, mode=int8, inputs=int8 outputs=float32)")


def test_convert_npz_matches_arrays_to_inputs_by_name(capsys, tmp_path):
    two_input_model(b_shape=(2, 2, 1)).save(tmp_path / "two.keras")
    rng = np.random.default_rng(0)
    xa, xb = rng.random((30, 4), "float32"), 10 * rng.random((30, 2, 2, 1), "float32")
    np.savez(tmp_path / "ab.npz", b=xb, a=xa)
    code, out, err, output = _convert_cli(capsys, tmp_path / "two.keras", tmp_path,
                                          "--data", str(tmp_path / "ab.npz"))
    assert code == 0, err
    scales = input_scales(inspect.summary(str(output)))
    assert scales["a"] == pytest.approx(xa.max() / 255, rel=1e-2)
    assert scales["b"] == pytest.approx(xb.max() / 255, rel=1e-2)


def test_convert_lut_writes_both_files_and_says_tflm_only(capsys, tmp_path):
    from clustering_models import clustered_qat

    data, model, _, final = clustered_qat()
    final.save(tmp_path / "clustered.keras")
    model.save(tmp_path / "float.keras")
    np.save(tmp_path / "x.npy", data.x_test[:50])
    out_path = tmp_path / "out" / "small.tflite"
    code, out, err = run(capsys, "convert", str(tmp_path / "clustered.keras"), "--lut",
                         "--lut_data", str(tmp_path / "x.npy"), "-o", str(out_path))
    assert code == 0, err
    lut_file = tmp_path / "out" / "small.lut.tflite"
    assert out_path.exists() and lut_file.stat().st_size < out_path.stat().st_size
    assert "TFLite Micro LUT-compressed tensors: 2" in out
    assert f"wrote {lut_file} ({lut_file.stat().st_size:,} bytes" in out
    assert "bit-identical on 50 samples" in out and "LiteRT has no TFLM_DECODE kernel" in out
    code, out, _ = run(capsys, "inspect", str(lut_file), "--json")
    assert code == 0 and len(json.loads(out)["compressed"]) == 2
    # A float model has nothing to compress: one line, exit 2, no file.
    bad = tmp_path / "bad" / "float.tflite"
    code, _, err = run(capsys, "convert", str(tmp_path / "float.keras"), "--mode", "float32",
                       "--lut", "--lut_data", str(tmp_path / "x.npy"), "-o", str(bad))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("tflite-ext convert: error: lut=True compresses int8 weights for "
                          "TFLite Micro: convert with mode='int8'. Received: mode='float32'")
    assert not bad.exists() and not bad.with_suffix(".lut.tflite").exists()
    assert_no_partial_files(tmp_path / "out")


# ----------------------------------------------------------------------------- issue 16

_WRAPPER = """import atexit, sys
atexit.register(lambda: print("\\nimported tensorflow:", "tensorflow" in sys.modules,
                              "keras:", "keras" in sys.modules))
from tflite_ext.cli import run
sys.argv = ["tflite-ext", *sys.argv[1:]]
run()
"""


def cli_subprocess(*argv, timeout=300):
    """Runs `tflite-ext ARGV` in a fresh Python: (exit code, stderr lines, whether TensorFlow
    or Keras had been imported when it exited)."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True,
                          text=True, timeout=timeout)
    last = done.stdout.splitlines()[-1].split()
    return done.returncode, done.stderr.splitlines(), last[2] == "True" or last[4] == "True"


def _unwritable_folder():
    """A folder no one may create files in, even root: sysfs (os.access says yes there)."""
    try:
        open("/sys/tflite_ext_probe", "wb").close()
    except OSError:
        return "/sys"
    pytest.skip("/sys is writable here")


@pytest.fixture(scope="module")
def bad_files(model_files, tiny_int8):
    """Every kind of bad input next to good ones, by name."""
    folder = model_files
    keras_bytes = (folder / "tiny.keras").read_bytes()
    files = {"empty.keras": b"", "text.keras": b"not a zip\n",
             "truncated.keras": keras_bytes[:len(keras_bytes) // 2],
             "weights.h5": b"\x89HDF\r\n\x1a\n", "text.npy": b"1,2,3\n",
             "model.tflite": tiny_int8.flatbuffer}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    import zipfile
    with zipfile.ZipFile(folder / "noconfig.keras", "w") as z:
        z.writestr("metadata.json", "{}")
    (folder / "not_saved_model").mkdir(exist_ok=True)
    (folder / "demo_out").mkdir(exist_ok=True)
    (folder / "demo_out" / "notes.txt").write_text("mine")
    return folder


_CASES = {  # name: (argv with {f} the fixture folder and {ro} an unwritable one, message)
    "missing model": ("convert {f}/missing.keras --data {f}/calib.npy",
                      r"Model path does not exist\. Received: '.*missing\.keras'$"),
    "empty .keras": ("convert {f}/empty.keras --data {f}/calib.npy", r"empty\.keras.* is empty"),
    "not a zip": ("convert {f}/text.keras", r"'.*text\.keras' is not a valid \.keras file "
                  r"\(not a complete zip archive.*\); re-save it with model\.save\("),
    "truncated zip": ("convert {f}/truncated.keras", r"is not a valid \.keras file .*re-save"),
    "zip without config.json": ("convert {f}/noconfig.keras", r"is not a valid \.keras file "
                                r"\(no config\.json in the zip archive\); re-save"),
    ".h5": ("convert {f}/weights.h5", r"Expected a \.keras file or a SavedModel folder \(re-save"),
    "folder not SavedModel": ("convert {f}/not_saved_model", "not a SavedModel"),
    "missing data": ("convert {f}/tiny.keras --data {f}/none.npy",
                     "Representative data file not found"),
    "data not npy": ("convert {f}/tiny.keras --data {f}/text.npy",
                     r"Cannot read representative data as \.npy/\.npz"),
    "missing lut_data": ("convert {f}/tiny.keras --lut --lut_data {f}/none.npy",
                         "file not found.*none\\.npy"),
    "convert output unwritable": ("convert {f}/tiny.keras --data {f}/calib.npy -o {ro}/m.tflite",
                                  r"Output folder is not writable \(Permission denied\)"),
    "demo out unwritable": ("demo --quick --out {ro}/demo", "Output folder is not writable"),
    "demo out holds other files": ("demo --quick --out {f}/demo_out",
                                   r"holds files this command did not write \(notes\.txt\)"),
    "demo bad stage": ("demo --stages bogus", "Unknown demo stage"),
    "demo empty stages": ("demo --stages=", "--stages is empty"),
    "bench out_dir unwritable": ("bench {f}/model.tflite --timer own --out_dir {ro}",
                                 "Output folder is not writable"),
    "bench empty threads": ("bench {f}/model.tflite --timer own --threads=",
                            r"--threads must be integers >= 1.*Received: --threads=''"),
    "bench zero threads": ("bench {f}/model.tflite --timer own --threads 1,0",
                           r"--threads must be integers >= 1"),
    "micro negative arena": ("micro {f}/model.tflite --arena_size -1", "--arena_size=-1"),
    "micro c_out unwritable": ("micro {f}/model.tflite --c_out {ro}",
                               r"Output folder is not writable \(Permission denied\)"),
    "android model not tflite": ("android {f}/tiny.keras --binary /bin/true",
                                 "Not a TFLite flatbuffer"),
    "android empty threads": ("android {f}/model.tflite --binary /bin/true --threads=",
                              "--threads must be integers"),
    "compress missing model": ("compress {f}/missing.keras --data {f}/calib.npy --val "
                               "{f}/calib.npy", "Model path does not exist"),
    "compress bad settings": ("compress {f}/tiny.keras --data {f}/calib.npy --val {f}/calib.npy "
                              "--settings 0.5,half",
                              r"--settings takes comma-separated floats\. Received: "
                              r"--settings=0\.5,half$"),
    "compress keep_names on host": ("compress {f}/tiny.keras --data {f}/calib.npy --val "
                                    "{f}/calib.npy --keep_names",
                                    r"--keep_names is for --target micro .* Received: "
                                    r"--target host$"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_input_is_one_line_before_tensorflow(bad_files, case):
    argv, message = _CASES[case]
    ro = _unwritable_folder() if "{ro}" in argv else None
    code, lines, tensorflow = cli_subprocess(*argv.format(f=bad_files, ro=ro).split())
    command = argv.split()[0]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"tflite-ext {command}: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not tensorflow  # answered at once, not after a multi-second import
    assert not [n for n in os.listdir(bad_files) if n.startswith(".tmp-")]


def test_error_after_tensorflow_is_one_line_too(bad_files, tmp_path):
    # The model loads (TensorFlow imported) before the data shape can be checked.
    np.save(tmp_path / "wrong.npy", np.zeros((4, 8, 4, 1), "float32"))
    code, lines, tensorflow = cli_subprocess("convert", str(bad_files / "tiny.keras"), "--data",
                                             str(tmp_path / "wrong.npy"), "-o",
                                             str(tmp_path / "m.tflite"))
    assert tensorflow
    assert code == 2 and len(lines) == 1, lines
    assert re.match(r"tflite-ext convert: error: representative_data shape \(4, 8, 4, 1\) "
                    r"does not match", lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path)) == ["wrong.npy"]  # no output, no temporary folder


def test_write_refused_mid_work_is_one_line_exit_1(capsys, bad_files, tmp_path):
    # The checks pass (the folder is writable) but the system refuses the write itself.
    (tmp_path / "model.h").mkdir()
    code, _, err = run(capsys, "micro", str(bad_files / "model.tflite"), "--runs", "1",
                       "--c_out", str(tmp_path))
    assert code == 1
    assert err == f"tflite-ext micro: error: Is a directory: '{tmp_path / 'model.h'}'\n"
    assert sorted(os.listdir(tmp_path)) == ["model.h"]
