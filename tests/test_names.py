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
