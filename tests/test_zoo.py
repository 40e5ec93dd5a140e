"""The model matrix's fast rows: the shapes users bring go through every stage, or get the
library's one-line answer (never a traceback). `tools/model_zoo.py` runs every row."""
import keras
import pytest

from tflite_ext.bench import zoo

ALL_PASS = ["softmax head", "Softmax layer", "sigmoid head", "dict outputs", "list outputs",
            "two inputs", "squeeze-excitation", "PReLU, LeakyReLU, Permute"]


@pytest.mark.parametrize("name", ALL_PASS)
def test_every_stage_passes(name):
    # Untrained rows: their weights come from the global seed, which the tests run before
    # would set otherwise (the squeeze-excitation row's int8 file failed XNNPACK's prepare
    # once, after another file's tests in the same process: see the issue note)
    keras.utils.set_random_seed(0)
    row = zoo.check(zoo.ROWS[name]())
    assert {stage: cell.text for stage, cell in row.items() if not cell.ok} == {}
    for stage in ("prune_strip", "qat_strip"):  # exact: the stated bound, and the figure
        assert float(row[stage].text.split()[1]) <= zoo.EXACT


def test_preprocessing_layers_get_the_skip_layers_to_paste():
    row = zoo.check(zoo.ROWS["Rescaling + Normalization"]())
    assert row["prune_strip"].ok and row["ptq_int8"].ok and row["tflm"].ok
    assert row["qat_int8"].text.startswith(
        "quantize_model cannot quantize 2 layer(s): 'rescaling' (Rescaling with scale=")
    assert "skip_layers=['rescaling', 'normalization']" in row["qat_int8"].text


def test_subclassed_model_converts_and_says_why_it_cannot_be_pruned():
    model, x = zoo.ROWS["subclassed"]()
    row = zoo.check(model, x)
    assert row["ptq_int8"].ok and row["tflm"].ok and row["agreement"].ok
    assert row["prune_strip"].text.startswith("The model must be a functional or Sequential")
    assert not any(cell.text.startswith("BUG") for cell in row.values())


def test_a_path_gets_one_line_where_a_model_is_needed(tmp_path):
    path = tmp_path / "saved_model"
    model = zoo.ROWS["softmax head"]()
    model.export(str(path), verbose=False)
    import numpy as np

    x = np.random.default_rng(0).random((8, 16, 16, 3)).astype("float32")
    row = zoo.check(str(path), x)
    assert row["ptq_int8"].ok and row["tflm"].ok
    assert row["prune_strip"].text.startswith("The model must be a keras.Model, not a path")
    assert row["agreement"].text == "n/a (no Keras model)"


def test_markdown_has_one_line_per_model_and_escapes_pipes():
    cell = zoo.Cell(False, "a | b", 1.0)
    text = zoo.markdown({"m": {"ptq_int8": cell}})
    assert text.splitlines()[2] == "| m | a \\| b | 1 |"
