"""names.strip: the file without tensor names, signatures and description runs the same."""
import numpy as np
from clustering_models import clustered_qat, lut_result

from tflite_ext import convert, flatbuffer_check, inspect, lut, names
from tflite_ext.bench import host, micro
from tflite_ext.compress import targets


def _all_names(flatbuffer):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    graph = model.Subgraphs(0)
    return ([graph.Tensors(t).Name() for t in range(graph.TensorsLength())],
            model.SignatureDefsLength(), model.Description())


def test_strip_drops_every_name_and_keeps_the_outputs(tiny_int8, digits):
    fb = tiny_int8.flatbuffer
    small = names.strip(fb)
    tensors, signatures, description = _all_names(small)
    assert set(tensors) == {None} and signatures == 0 and description is None
    assert any(_all_names(fb)[0]) and _all_names(fb)[1] == 1
    assert len(small) < len(fb)
    flatbuffer_check.check(small)
    assert names.strip(small) == small  # nothing left to strip
    # The same operators, tensors and buffers: LiteRT's int8 outputs are identical.
    x = digits.x_test[:50]
    assert np.array_equal(host.predict(fb, x), host.predict(small, x))
    info = inspect.summary(small)  # an unnamed tensor is "" (it raised before)
    assert [t["name"] for t in info["tensors"]] == [""] * len(info["tensors"])
    assert info["macs"] == inspect.summary(fb)["macs"]


def test_lut_copy_stripped_is_proven_in_tflm_and_measured_so():
    data, _, _, final = clustered_qat()
    named = lut_result()
    bare = convert.to_tflite(final, lut=True, lut_data=data.x_test[:200], strip_names=True)
    # Both files lose their names; the LUT copy is proven on the stripped bytes.
    assert len(bare.flatbuffer) < len(named.flatbuffer)
    assert len(bare.lut.flatbuffer) < len(named.lut.flatbuffer)
    assert bare.lut.report["verified"]["samples"] == 200
    assert lut.verify(named.flatbuffer, bare.lut.flatbuffer, data.x_test[:100])["samples"] == 100
    assert bare.report["size_bytes"] == len(bare.flatbuffer)
    assert len(inspect.summary(bare.lut.flatbuffer)["compressed"]) == 2
    # The micro target measures what it deploys: the stripped copy, same arena.
    kept, stripped = targets.Micro(strip_names=False), targets.Micro()
    assert kept.key != stripped.key
    both = stripped.measure({"lut": named.lut.flatbuffer})["lut"]
    assert both["flash_bytes"] == len(stripped.deploy(named.lut.flatbuffer)) \
        == len(bare.lut.flatbuffer)
    assert both["arena_bytes"] == micro.minimum_arena(named.lut.flatbuffer, 1)
    assert kept.measure({"lut": named.lut.flatbuffer})["lut"]["flash_bytes"] == \
        len(named.lut.flatbuffer)


def _residual_qat(x):
    """Conv-BN-ReLU with a residual add, quantization-aware and calibrated on `x`."""
    import keras

    from tflite_ext.quantization import calibrate, quantize_model

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1), name="pixels")
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.Add()([h, keras.layers.Conv2D(8, 1)(inputs)])
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    return calibrate(quantize_model(keras.Model(inputs, outputs)), x)


def test_a_traced_conversion_is_the_saved_model_file_without_its_signature(trained_tiny, digits):
    import keras

    x = digits.x_train[:64]
    sequential = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(10)])
    for model, data in ((trained_tiny, x), (_residual_qat(x), None), (sequential, x)):
        signed = convert.to_tflite(model, data).flatbuffer
        traced = convert.to_tflite(model, data, signature=False).flatbuffer
        assert _all_names(signed)[1] == 1 and _all_names(traced)[1] == 0
        assert len(signed) - len(traced) in range(64, 256)  # the signature def, I/O names
        # the same operators, tensors and buffers: what names.strip leaves is the same bytes
        assert names.strip(traced) == names.strip(signed)
        # strip_names converts that way too (its names go anyway)
        assert convert.to_tflite(model, data, strip_names=True).flatbuffer == names.strip(signed)
        assert np.array_equal(host.predict(traced, x), host.predict(signed, x))


def test_signature_false_needs_a_model_in_memory_with_one_input(tmp_path):
    import keras
    import pytest

    from tflite_ext.errors import InputError

    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    two = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(InputError, match=r"^signature=False .* one input and one output\. "
                                         r"Received: model=.* with 2 input\(s\) and 1 "
                                         r"output\(s\)$"):
        convert.to_tflite(two, mode="float32", signature=False)
    # Several outputs: the trace orders them otherwise than the signature, so strip_names
    # takes the SavedModel route there (its stripped file is the ordinary one's)
    inputs = keras.Input((4,), name="x")
    outputs = {"zeta": keras.layers.Dense(3)(inputs), "alpha": keras.layers.Dense(5)(inputs)}
    several = keras.Model(inputs, outputs)
    with pytest.raises(InputError, match=r"with 1 input\(s\) and 2 output\(s\)$"):
        convert.to_tflite(several, mode="float32", signature=False)
    assert convert.to_tflite(several, mode="float32", strip_names=True).flatbuffer == \
        names.strip(convert.to_tflite(several, mode="float32").flatbuffer)
    path = str(tmp_path / "m.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    with pytest.raises(InputError, match=r"in memory .* Received: model='.*m\.keras'$"):
        convert.to_tflite(path, mode="float32", signature=False)
    # strip_names on them takes the SavedModel route, the names stripped after
    assert _all_names(convert.to_tflite(two, mode="float32", strip_names=True)
                      .flatbuffer)[1] == 0
