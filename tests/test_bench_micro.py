"""tflite_ext.bench.micro with the real TFLM interpreter (tflite_micro) and LiteRT."""
import json
import os
import shutil
import subprocess

import keras
import pytest
import tensorflow as tf
import tflite_micro

from tflite_ext import convert, models, tasks
from tflite_ext.bench import host, micro
from tflite_ext.errors import InputError


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    keras.utils.set_random_seed(0)
    split = tasks.digits()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    models.compile_classifier(model, 1e-2)
    model.fit(split.x_train, split.y_train, epochs=5, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("micro") / "digits_int8.tflite"
    convert.to_tflite(model, split.x_train[:200]).save(str(path))
    return str(path), split


@pytest.fixture(scope="module")
def analysis(digits_int8):
    path, split = digits_int8
    return micro.analyze(path, split.x_test, runs=10)


def test_arena_is_exact_and_flash_is_model_size(digits_int8, analysis):
    path, _ = digits_int8
    arena = analysis["arena_bytes"]
    assert micro.arena_works(path, arena)
    assert not micro.arena_works(path, arena - 1)
    assert not micro.arena_works(path, arena - 16)
    # The recording allocator's total can leave out the allocator's own objects.
    assert 0 < analysis["arena_report"]["total"] <= arena
    assert analysis["arena_report"]["head"] + analysis["arena_report"]["tail"] == \
        analysis["arena_report"]["total"]
    assert analysis["size_bytes"] == os.path.getsize(path)
    assert "flash_bytes" not in analysis and "unsupported_ops" not in analysis
    assert analysis["arena_suggestion"] % 16 == 0 and analysis["arena_suggestion"] >= arena + 16


def test_tflm_agrees_with_litert_on_digits(analysis):
    agreement = analysis["agreement"]
    assert agreement["samples"] == 540
    assert agreement["top1_agreement"] >= 0.99
    assert agreement["max_diff_steps"] <= 2      # same int8 kernels up to rounding
    assert 0 < analysis["latency"]["min_us"] <= analysis["latency"]["median_us"]
    assert analysis["op_counts"] == {"CONV_2D": 1, "MAX_POOL_2D": 1, "RESHAPE": 1,
                                     "FULLY_CONNECTED": 1}


def test_arena_too_small(digits_int8, analysis):
    path, _ = digits_int8
    small = analysis["arena_bytes"] - 16
    with pytest.raises(InputError, match=rf"^Tensor arena too small: TFLM needs "
                                         rf"{analysis['arena_bytes']} bytes for this model\. "
                                         rf"Received: arena_size={small}$"):
        micro.analyze(path, arena_size=small)


def test_op_tflm_lacks_is_listed_before_running(tmp_path):
    class TopK(keras.layers.Layer):
        def call(self, x):
            return tf.math.top_k(x, 3).values

    inputs = keras.Input((10,))
    model = keras.Model(inputs, TopK()(keras.layers.Dense(10)(inputs)))
    path = convert.to_tflite(model, mode="float32").save(str(tmp_path / "topk.tflite"))
    assert micro.unsupported_ops(path) == ["TOPK_V2"]
    with pytest.raises(InputError, match=r"^micro needs a full-integer model with kernels in "
                                         r"TFLite Micro: TFLM has no kernel for TOPK_V2: replace "
                                         r"that layer, or measure the model with LiteRT \(bench "
                                         r"host\); the model computes in float: .*Received: "
                                         r"ops=\['FULLY_CONNECTED', 'TOPK_V2'\]$"):
        micro.analyze(path)


def test_float_model_is_refused():
    sine = os.path.join(os.path.dirname(tflite_micro.__file__), "python", "tflite_micro",
                        "sine_float.tflite")
    assert micro.unsupported_ops(sine) == []
    with pytest.raises(InputError) as error:
        micro.analyze(sine)
    assert str(error.value) == (
        "micro needs a full-integer model with kernels in TFLite Micro: the model computes in "
        "float: convert it with tflite_ext.convert.to_tflite(model, representative_data) "
        "(mode='int8', the default). Received: ops=['FULLY_CONNECTED']")


class Floor(keras.layers.Layer):
    """No int8 kernel in TFLite (TFLM has a float one): stays float through allow_float."""

    def call(self, x):
        return keras.ops.floor(x)


def test_int8_model_with_float_parts_is_refused_naming_each(tmp_path):
    # Converted with mode='int8': the message must not say "convert with mode='int8'", but
    # name the float op and the float I/O, each with its fix.
    split = tasks.digits()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(Floor(name="floor")(x))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))
    result = convert.to_tflite(model, split.x_train[:50], mode="int8", allow_float=["FLOOR"],
                               io_dtype="float32")
    info = result.report
    [floor] = [op for op in info["operators"] if op["op"] == "FLOOR"]
    assert micro.unsupported_ops(result.flatbuffer) == []
    with pytest.raises(InputError) as error:
        micro.check_model(result.flatbuffer)
    assert str(error.value) == (
        "micro needs a full-integer model with kernels in TFLite Micro: "
        f"input '{info['inputs'][0]['name']}' is float32: convert with io_dtype='int8' (the "
        f"default); output '{info['outputs'][0]['name']}' is float32: convert with "
        f"io_dtype='int8' (the default); FLOOR#{floor['index']} "
        f"('{info['tensors'][floor['outputs'][0]]['name']}') stays float (the converter had no "
        "int8 kernel for it and allow_float let it stay): replace that layer with one that has "
        "an int8 kernel, then convert without 'FLOOR' in allow_float. Received: ops=['CONV_2D', "
        "'DEQUANTIZE', 'FLOOR', 'FULLY_CONNECTED', 'QUANTIZE', 'RESHAPE']")
    assert "mode='int8'" not in str(error.value)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_export_compiles_aligned_and_byte_identical(digits_int8, analysis, tmp_path):
    path, _ = digits_int8
    h, c = micro.write_c_source(path, str(tmp_path), "digits_model", analysis["arena_bytes"])
    header = open(h).read()
    assert f"#define DIGITS_MODEL_LEN {os.path.getsize(path)}" in header
    assert f"#define DIGITS_MODEL_ARENA_SIZE {analysis['arena_suggestion']}" in header
    (tmp_path / "main.c").write_text(
        '#include <stdint.h>\n#include <stdio.h>\n#include "digits_model.h"\n'
        "int main(void) {\n"
        "  if ((uintptr_t)digits_model % 16 != 0) return 3;\n"
        "  if (digits_model_len != DIGITS_MODEL_LEN) return 4;\n"
        "  fwrite(digits_model, 1, digits_model_len, stdout);\n  return 0;\n}\n")
    exe = tmp_path / "dump"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-o", str(exe), c,
                    str(tmp_path / "main.c")], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, check=True).stdout
    assert out == open(path, "rb").read()
    with pytest.raises(InputError, match=r"^name must be a C identifier\. Received: name='9x'$"):
        micro.c_source(path, "9x")


def test_cli_micro_json_and_c_files(digits_int8, analysis, tmp_path, capsys):
    from absl import flags
    from tflite_ext.bench.commands import COMMANDS
    command = {c.name: c for c in COMMANDS}["micro"]
    fv = flags.FlagValues()
    command.define_flags(fv)
    path, _ = digits_int8
    fv(["micro", f"--model={path}", "--task=digits", "--samples=50", "--runs=3", "--json",
        f"--c_out={tmp_path}", "--c_name=digits"])
    assert command.main(fv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arena_bytes"] == analysis["arena_bytes"]
    assert printed["agreement"]["samples"] == 50
    assert sorted(os.listdir(tmp_path)) == ["digits.c", "digits.h"]


def test_micro_markdown_report(analysis, tmp_path):
    from tflite_ext.bench import report
    text = report.micro_markdown(dict(analysis, model="digits_int8.tflite"))
    assert f"| tensor arena bytes (exact minimum) | {analysis['arena_bytes']:,} |" in text
    assert f"| model (flash) bytes | {analysis['size_bytes']:,} |" in text
    json_path, md_path = report.write_report(str(tmp_path), "micro", analysis, text)
    assert json.loads(open(json_path).read())["arena_bytes"] == analysis["arena_bytes"]
    assert open(md_path).read() == text


def test_softmax_with_a_tiny_input_scale_is_refused_before_tflm_aborts():
    # An untrained classifier's logits are all ~0: the int8 SOFTMAX input scale falls under
    # 2^-26 and TFLM's kernel aborts the whole process (seen on Keras' MobileNet).
    import numpy as np
    from keras import layers

    def softmax_model(factor):
        keras.utils.set_random_seed(0)
        i = keras.Input((8, 8, 3))
        dense = layers.Dense(10)
        x = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3, padding="same")(i))
        model = keras.Model(i, layers.Softmax()(dense(x)))
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel * factor, bias])
        x = np.random.default_rng(0).random((16, 8, 8, 3)).astype("float32")
        return convert.to_tflite(model, x).flatbuffer

    with pytest.raises(InputError, match=r"SOFTMAX#\d+ .* has input scale [0-9.e-]+, below the "
                                         r"2\^-26 TFLM's kernel needs \(it aborts\)"):
        micro.check_model(softmax_model(1e-7))
    fine = softmax_model(1e-5)  # a small but workable scale: checked, and TFLM runs it
    micro.check_model(fine)
    assert micro.allocation_report(fine)["total"] > 0


def test_lut_model_arena_decode_buffers_and_decode_cost(tmp_path):
    from clustering_models import clustered_qat, lut_result

    result, x = lut_result(), clustered_qat()[0].x_test[:20]
    path = result.save(str(tmp_path / "small.tflite"))
    small = str(tmp_path / "small.lut.tflite")
    r = micro.analyze(small, x, runs=5, reference=path)
    assert micro.arena_works(small, r["arena_bytes"])
    assert not micro.arena_works(small, r["arena_bytes"] - 1)
    c = r["compression"]
    assert (c["tensors"], c["decode_ops"], c["weights"]) == (2, 2, 1152 + 2560)
    assert c["decode_buffer_bytes"] == 2560 and c["decoded_bytes"] == 1152 + 2560
    assert c["stored_bytes"] == 368 + 984 and c["alt_suggestion"] == 2560
    # With the decode buffer outside the arena, the arena needs less.
    assert c["arena_bytes_with_alt"] < r["arena_bytes"]
    assert micro.arena_works(small, c["arena_bytes_with_alt"], alt=2560)
    ref = c["reference"]
    assert ref["identical"] is True and ref["size_bytes"] == os.path.getsize(path)
    assert ref["flash_saved_bytes"] == os.path.getsize(path) - os.path.getsize(small) > 0
    assert ref["arena_bytes"] < r["arena_bytes"]   # the decode buffers live in the arena
    assert "agreement" not in r                     # LiteRT cannot run TFLM_DECODE
    with pytest.raises(InputError, match=r"^reference compares a LUT-compressed model"):
        micro.analyze(path, x, reference=path)


def test_evaluate_in_tflm_matches_litert_and_runs_lut_files(digits_int8, tmp_path):
    from clustering_models import clustered_qat, lut_result

    path, split = digits_int8
    tflm = micro.evaluate(path, split.x_test, split.y_test)
    lite = host.evaluate(path, split.x_test, split.y_test)
    # the same quantized inputs; TFLM and LiteRT agreed on top-1 for every test image above
    assert tflm == lite and tflm["samples"] == len(split.y_test)
    result, data = lut_result(), clustered_qat()[0]
    small = result.lut.flatbuffer  # only TFLM runs it: its accuracy is the int8 file's
    assert (micro.evaluate(small, data.x_test, data.y_test)
            == micro.evaluate(result.flatbuffer, data.x_test, data.y_test))
    with pytest.raises(InputError, match=r"x and y must have the same length"):
        micro.evaluate(path, split.x_test, split.y_test[:3])


def test_the_tflm_child_is_kept_and_replaced_when_it_dies(digits_int8, analysis, monkeypatch):
    import select

    path, _ = digits_int8
    arena = analysis["arena_bytes"]
    micro._stop_child()
    assert micro._run_worker([path], arena, 1)[0]["ok"]
    first = micro._child
    assert not micro._run_worker([path], arena - 1, 1)[0]["ok"] and micro._child is first
    assert micro.minimum_arena(path) == arena and micro._child is first  # one process
    first.proc.kill()                                              # died between jobs
    assert micro._run_worker([path], arena, 1)[0]["ok"] and micro._child is not first
    # Every attempt TFLM refuses leaves a copy of the model in the child: past the bound, a
    # new child.
    monkeypatch.setattr(micro._Child, "MAX_REFUSED_BYTES", os.path.getsize(path))
    grown = micro._child
    assert not micro._run_worker([path], arena - 1, 1)[0]["ok"] and micro._child is grown
    assert micro._run_worker([path], arena, 1)[0]["ok"] and micro._child is not grown
    assert grown.proc.poll() is not None
    # Interrupted while waiting (Ctrl-C): the child may still answer that job later, into the
    # next one's reading, so it goes.
    kept, real_select = micro._child, select.select

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(select, "select", interrupted)
    with pytest.raises(KeyboardInterrupt):
        micro._run_worker([path], arena, 1)
    monkeypatch.setattr(select, "select", real_select)
    assert micro._child is None and kept.proc.poll() is not None
    assert micro._run_worker([path], arena, 1)[0]["ok"]
    # A child that dies inside a job (as TFLM can on a far too small arena): the paths before
    # it keep their results, the one it died on is marked, and the next job gets a new child.
    micro._stop_child()
    monkeypatch.setattr(micro, "_WORKER", micro._WORKER.replace(
        '    for path in job["paths"]:\n',
        '    for k, path in enumerate(job["paths"]):\n'
        '        if k == 1:\n            os._exit(3)\n'))
    results = micro._run_worker([path, path, path], arena, 1)
    assert [r["ok"] for r in results] == [True, False] and results[1]["crashed"]
    assert results[1]["error"] == "TFLM crashed (exit status 3)" and micro._child is None
    assert micro._run_worker([path], arena, 1)[0]["ok"]
    micro._stop_child()
