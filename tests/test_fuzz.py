"""Mutated and truncated flatbuffers through inspect, bench host, micro and convert.

Every outcome must be a success or a `tflite_ext.errors` type. The native paths run in worker
processes (tools/fuzz_flatbuffers.py, the same harness as the 10,000-case run), so a native
crash fails the test naming its case instead of killing pytest. The seeds are small int8 models
converted here with the real converter; the flatbuffer_check tests edit one field of a real model
each and expect the exact one-line message.
"""
import importlib.util
import os
import re

import numpy as np
import pytest

from tflite_ext import flatbuffer_check, inspect, names
from tflite_ext.bench import host
from tflite_ext.errors import InvalidModelError, ModelFileError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "fuzz_flatbuffers", os.path.join(REPO, "tools", "fuzz_flatbuffers.py"))
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)
FIX = "Re-convert the model (tflite-ext convert) or check the file was copied whole."


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz_seeds"))
    fuzz.load_seeds(folder)  # the four seed models, converted once
    return folder


@pytest.fixture(scope="module")
def dense(seeds_dir):
    return fuzz.load_seeds(seeds_dir)["dense_int8"]


def _assert_only_project_errors(path, cases, seed, seeds_dir):
    results = fuzz.run_path(path, cases, seed, seeds_dir, batch=cases)
    assert len(results) == cases
    bad = [r for r in results if fuzz._bad(r["outcome"])]
    assert not bad, "; ".join(
        f"case {r['case']} ({r.get('seed_model')} {r.get('mutation')}): {r['outcome']} "
        f"{r['message']} [python tools/fuzz_flatbuffers.py --replay {path}:{r['case']} "
        f"--seed {seed}]" for r in bad[:5])
    counts = {r["outcome"] for r in results}
    # The mutations reach both sides: models that still run, and ones refused in one line.
    assert "ok" in counts and "InvalidModelError" in counts, counts
    return results


@pytest.mark.parametrize("path, cases", [("inspect", 500), ("host", 500), ("micro", 40)])
def test_mutated_flatbuffers_give_only_project_errors(seeds_dir, path, cases):
    _assert_only_project_errors(path, cases, 11, seeds_dir)


def test_mutated_keras_files_through_convert(seeds_dir):
    results = fuzz.run_path("convert", 8, 11, seeds_dir, batch=8)
    bad = [r for r in results if fuzz._bad(r["outcome"])]
    assert not bad, [(r["case"], r["outcome"], r["message"]) for r in bad]


def test_every_seed_passes_the_check_and_truncations_do_not(seeds_dir):
    for name, data in fuzz.load_seeds(seeds_dir).items():
        assert flatbuffer_check.check(data) == data, name
        for cut in (len(data) - 1, len(data) // 2, 9):
            with pytest.raises(InvalidModelError, match=r"^Corrupt or truncated \.tflite: .*"
                                                        r"(points outside|runs past)"):
                flatbuffer_check.check(data[:cut])


def _edited(data, edit):
    """The model with one field changed through the schema's object API, re-packed."""
    return names.rewrite(data, edit)


def _set(path, value):
    def edit(model):
        *parents, last = path
        obj = model
        for p in parents:
            obj = obj[p] if isinstance(p, int) else getattr(obj, p)
        if isinstance(last, int):  # numpy views of the read-only bytes: copy, then change
            array = np.array(obj)
            array[last] = value
            _set(parents, array)(model)
        else:
            setattr(obj, last, value)
    return edit


T = ("subgraphs", 0, "tensors")
OP = ("subgraphs", 0, "operators")


def _uncounted(text):
    return re.sub(r"(functional|dense)(_\d+)+", r"\1", text)


@pytest.mark.parametrize("edit, problem", [
    (_set((*T, 1, "quantization", "zeroPoint", 0), 16777196),
     "tensor 1 'functional_1/dense_1_2/MatMul' zero point 16777196 is outside int8 [-128, 127]"),
    (_set((*T, 4, "quantization", "scale", 0), 1e-35),
     "tensor 4 'StatefulPartitionedCall_1:0' has scale 1e-35, outside [1e-30, 1e+30]"),
    (_set((*T, 2, "quantization", "scale"), np.ones(3, np.float32)),
     "tensor 2 'functional_1/dense_1/MatMul' has 3 scales and 12 zero points"),
    (_set((*T, 2, "shape"), np.array([12, 15], np.int32)),
     "tensor 2 'functional_1/dense_1/MatMul' has 192 bytes of constant data, its shape [12, 15] "
     "of int8 needs 180"),
    (_set((*T, 3, "shape"), np.array([1, -12], np.int32)),
     "tensor 3 'functional_1/dense_1/MatMul;functional_1/dense_1/Relu' has shape [1, -12]: "
     "dimensions must be >= 0"),
    (_set((*T, 3, "buffer"), 99), "tensor 3 'functional_1/dense_1/MatMul;functional_1/dense_1/"
                                  "Relu' uses buffer 99, the model has 8"),
    (_set((*T, 0, "name"), b"in\xffput"), "tensor 0's name is not UTF-8 text (b'in\\xffput')"),
    (_set((*OP, 0, "inputs", 1), 5), "operator 0 input 5 is not one of the 5 tensors"),
    (_set((*OP, 1, "outputs", 0), 1),
     "operator 1 writes tensor 1 'functional_1/dense_1_2/MatMul', a constant"),
    (_set((*OP, 1, "opcodeIndex"), 3), "operator 1 has opcode index 3, the model has 1 "
                                       "operator codes"),
    (_set(("subgraphs", 0, "inputs", 0), 2),
     "tensor 2 'functional_1/dense_1/MatMul' is a subgraph input and a constant"),
    (_set(("buffers", 2, "offset"), 10**6), "buffer 2 ends at byte 1,000,000, past the end of "
                                            "the file"),
    (_set(("version",), 4), "schema version 4, expected 3"),
])
def test_check_names_the_first_problem(dense, edit, problem):
    bad = _edited(dense, edit)
    with pytest.raises(InvalidModelError) as info:
        flatbuffer_check.check(bad, "m.tflite")
    message = str(info.value)
    # Tensor names carry Keras' per-process layer counters ('functional_44_1/dense_52_1/...'
    # after other tests built models): compare them up to those numbers.
    assert _uncounted(message).startswith(_uncounted(f"Not a valid .tflite: {problem}")), message
    assert message.endswith(f". {FIX} Received: m.tflite") and "\n" not in message
    # Every entry refuses it before a runtime sees it, naming the file it was given.
    for entry in (inspect.summary, host.time_model, host.describe):
        with pytest.raises(InvalidModelError, match=r"^Not a valid \.tflite: .*Received: "
                                                    r"[0-9,]+ bytes$"):
            entry(bad)


def test_a_runtime_error_on_a_checked_model_is_one_line(tmp_path):
    """A model that passes the check but that LiteRT cannot feed one sample at a time (batch
    5): the runtime's first line, as a project error naming the file."""
    import keras

    from tflite_ext import convert

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    x = np.random.default_rng(0).random((16, 4), dtype=np.float32)
    path = str(tmp_path / "batch5.tflite")
    convert.to_tflite(model, x, batch_size=5).save(path)
    flatbuffer_check.check(open(path, "rb").read())
    with pytest.raises(ModelFileError) as info:
        host.time_model(path, runs=1)
    assert str(info.value) == (
        "LiteRT cannot run the model (Cannot set tensor: Dimension mismatch. Got 1 but expected "
        f"5 for dimension 0 of input 0.). Received: {path}")


def test_cli_inspect_prints_one_line_for_mutated_files(seeds_dir, tmp_path, capsys):
    from tflite_ext import cli

    seeds, codes = fuzz.load_seeds(seeds_dir), set()
    for case in range(60):
        name, data, how = fuzz.case_input(seeds, 5, case)
        path = tmp_path / f"case{case}.tflite"
        path.write_bytes(data)
        code = cli.main(["inspect", str(path)])
        _, err = capsys.readouterr()
        codes.add(code)
        assert code in (0, 2), (case, how, err)
        if code == 2:  # the message alone: no traceback
            assert err.startswith("tflite-ext inspect: error: ") and err.count("\n") == 1, err
    assert codes == {0, 2}
