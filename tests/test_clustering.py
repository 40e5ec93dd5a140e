"""tflite_ext.clustering: the wrapper the Keras way, QAT composition, pruned zeros, the LUT
stage end to end (real converter, real TFLM), and every bad input of issue 14."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from clustering_models import CLUSTERS, clustered_qat, float_model, lut_result
from conftest import assert_no_partial_files
from tflite_ext import clustering, convert, lut, models, pruning
from tflite_ext.clustering import ClusteringCallback, ClusterWrapper
from tflite_ext.errors import ConversionError, InputError, UnsupportedLayerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense_model(units=6, features=16):
    inputs = keras.Input((features,), name="x")
    return keras.Model(inputs, keras.layers.Dense(units, name="dense")(inputs), name="dense_m")


def int8_weights(flatbuffer):
    """{tensor name: int8 array} of the constant int8 tensors of a flatbuffer."""
    model = schema.Model.GetRootAs(flatbuffer, 0)
    graph, found = model.Subgraphs(0), {}
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        buffer = model.Buffers(tensor.Buffer())
        if tensor.Type() == schema.TensorType.INT8 and buffer.DataLength():
            found[tensor.Name().decode()] = buffer.DataAsNumpy().view(np.int8).reshape(
                tensor.ShapeAsNumpy())
    return found


def test_wrapper_the_keras_way(tmp_path):
    keras.utils.set_random_seed(0)
    model = clustering.cluster(_dense_model(), 8, init="linear")
    wrapper = model.get_layer("dense")
    assert isinstance(wrapper, ClusterWrapper) and wrapper.clusters == 8
    # The layer's kernel and bias, plus centroids, pinned flags and assignments.
    assert sorted(v.name for v in wrapper.weights) == [
        "bias", "kernel", "kernel_assignments", "kernel_centroids", "kernel_pinned"]
    assert len(wrapper.trainable_weights) == 3
    kernel = wrapper.clustered_weights()["kernel"]
    assert len(np.unique(kernel)) == 8                       # linear: every centroid used
    x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    expected = x @ kernel + wrapper.layer.bias.numpy()
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    models.compile_classifier(model, 1e-2)
    before = wrapper.cluster_vars["kernel"][0].numpy().copy()
    model.fit(x, np.arange(32) % 6, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(before, wrapper.cluster_vars["kernel"][0].numpy())
    model.save(tmp_path / "clustered.keras")
    loaded = keras.saving.load_model(tmp_path / "clustered.keras")
    np.testing.assert_array_equal(loaded(x), model(x))
    stripped = clustering.strip_clustering(loaded)
    assert not any(isinstance(layer, ClusterWrapper) for layer in stripped.layers)
    np.testing.assert_array_equal(stripped(x), model(x))
    assert len(np.unique(stripped.get_layer("dense").kernel.numpy())) <= 8


def test_centroid_gradient_is_the_sum_over_its_weights():
    model = clustering.cluster(_dense_model(), 4, init="linear")
    wrapper = model.get_layer("dense")
    x = np.random.default_rng(1).normal(size=(5, 16)).astype("float32")
    centroids, _, assignments = wrapper.cluster_vars["kernel"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x, training=True) ** 2)
    grad_c, grad_k = tape.gradient(loss, [centroids.value, wrapper.layer.kernel.value])
    per_weight = grad_k.numpy()  # straight through: the latent kernel gets each weight's own
    sums = np.bincount(assignments.numpy().ravel(), per_weight.ravel(), minlength=4)
    np.testing.assert_allclose(grad_c.numpy().ravel(), sums, rtol=1e-5, atol=1e-5)


def test_refresh_moves_weights_and_snaps_the_latent_kernel():
    model = clustering.cluster(_dense_model(), 4, init="linear")
    wrapper = model.get_layer("dense")
    kernel = wrapper.layer.kernel
    kernel.assign(kernel.numpy() + 0.3)  # every latent weight moves far from its centroid
    moved = wrapper.update_assignments()
    assert moved > 0
    np.testing.assert_array_equal(kernel.numpy(), wrapper.clustered_weights()["kernel"])
    assert wrapper.update_assignments() == 0


def test_pruned_zero_stays_exactly_zero():
    keras.utils.set_random_seed(0)
    source = _dense_model(8, 32)
    kernel = source.get_layer("dense").kernel
    zeros = np.random.default_rng(0).random(kernel.shape) < 0.5
    kernel.assign(np.where(zeros, 0.0, kernel.numpy()))
    model = clustering.cluster(source, 4)
    models.compile_classifier(model, 1e-2)
    x = np.random.default_rng(0).normal(size=(64, 32)).astype("float32")
    model.fit(x, np.arange(64) % 8, epochs=3, batch_size=8, verbose=0,
              callbacks=[ClusteringCallback(update_every=2)])
    final = clustering.strip_clustering(model).get_layer("dense").kernel.numpy()
    np.testing.assert_array_equal(final[zeros], 0.0)
    assert (final[~zeros] != 0).all()
    assert len(np.unique(final)) <= 4                       # zero is one of the 4 values


def test_qat_int8_keeps_at_most_clusters_values_per_channel():
    data, _, clustered, final = clustered_qat()
    x = data.x_test[:64]
    np.testing.assert_array_equal(final.predict(x, verbose=0), clustered.predict(x, verbose=0))
    weights = int8_weights(lut_result().flatbuffer)
    conv2 = next(w for n, w in weights.items() if "quant_conv2" in n)
    logits = next(w for n, w in weights.items() if "quant_logits" in n)
    assert max(len(np.unique(channel)) for channel in conv2) <= CLUSTERS["conv2"]
    assert len(np.unique(logits)) <= CLUSTERS["logits"]       # per tensor: Dense is per tensor


def test_lut_copy_is_smaller_and_identical_in_tflm(tmp_path):
    result = lut_result()
    report = result.lut.report
    assert report["verified"] == {"samples": 200, "identical": True, "outputs": 1}
    assert [(t["bits"], t["axis"]) for t in report["tensors"]] == [(2, 0), (3, None)]
    saved = sum(t["bytes"] - t["lut_bytes"] for t in report["tensors"])
    assert 0 < len(result.flatbuffer) - len(result.lut.flatbuffer) < saved
    path = result.save(str(tmp_path / "small.tflite"))
    assert open(path, "rb").read() == result.flatbuffer
    assert open(tmp_path / "small.lut.tflite", "rb").read() == result.lut.flatbuffer
    assert_no_partial_files(tmp_path)


def test_per_layer_clusters_and_per_channel():
    _, model, _, _ = clustered_qat()
    clustered = clustering.cluster(model, {"conv2": 5}, per_channel={"conv2": True})
    wrappers = clustering.clustering_wrappers(clustered)
    assert [(w.name, w.clusters, w.per_channel) for w in wrappers] == [("conv2", 5, True)]
    assert wrappers[0].cluster_vars["kernel"][0].shape == (16, 5)


@pytest.mark.parametrize("clusters", [1, 129, True, 2.5])
def test_bad_cluster_count_is_one_line(clusters):
    with pytest.raises(InputError, match=r"^clusters must be an integer in \[2, 128\] \(TFLite "
                                         rf"Micro's LUT indexes 1-7 bits\)\. Received: "
                                         rf"clusters={clusters!r}$"):
        clustering.cluster(_dense_model(), clusters)


def test_bad_layers_and_models():
    with pytest.raises(InputError, match=r"^layer 'dense' has 16 kernel weights per channel, "
                                         r"fewer than clusters=32: leave it out"):
        clustering.cluster(_dense_model(), 32, per_channel=True)
    with pytest.raises(InputError, match=r"^init must be one of"):
        clustering.cluster(_dense_model(), 4, init="random")
    with pytest.raises(InputError, match=r"^layers matched no Dense/Conv layer"):
        clustering.cluster(_dense_model(), 4, layers=["nope"])
    clustered = clustering.cluster(_dense_model(), 4)
    with pytest.raises(InputError, match=r"^The model is already clustered"):
        clustering.cluster(clustered, 4)
    with pytest.raises(InputError, match=r"^strip_clustering\(\) needs a model returned by "
                                         r"cluster\(\)"):
        clustering.strip_clustering(_dense_model())
    with pytest.raises(InputError, match=r"^cluster\(\) takes a pruned model after "
                                         r"pruning\.strip\(\)"):
        clustering.cluster(pruning.prune(float_model(), 0.5), 4)
    with pytest.raises(UnsupportedLayerError, match=r"^ClusterWrapper wraps Dense"):
        ClusterWrapper(keras.layers.ReLU(name="relu"))


def test_lut_bad_input_is_one_line_and_writes_nothing(tmp_path):
    data, model, _, _ = clustered_qat()
    x = data.x_train[:50]
    with pytest.raises(InputError, match=r"^lut=True compresses int8 weights for TFLite Micro: "
                                         r"convert with mode='int8'\. Received: mode='float32'$"):
        convert.to_tflite(model, mode="float32", lut=True, lut_data=x)
    with pytest.raises(InputError, match=r"^lut must be True or a maximum index width in bits, "
                                         r"1-7 \(TFLite Micro's LUT\)\. Received: lut=8$"):
        convert.to_tflite(model, x, lut=8)
    with pytest.raises(InputError, match=r"^lut=True proves the compressed model .* Received: "
                                         r"lut_data=None$"):
        convert.to_tflite(clustered_qat()[3], lut=True)
    # An unclustered int8 model: nothing with few enough values to gain from.
    with pytest.raises(InputError, match=r"^lut=True found no int8 weight tensor with at most "
                                         r"2\^3 distinct values"):
        convert.to_tflite(model, x, lut=3)
    float_file = convert.to_tflite(model, mode="float32").flatbuffer
    with pytest.raises(InputError, match=r"^lut=True compresses int8 weights, and this model "
                                         r"has none \(a float model\?\)"):
        lut.compress(float_file)
    assert os.listdir(tmp_path) == []


def test_tflm_without_compression_tools_is_one_line(tmp_path):
    # An older tflite-micro wheel has no tflite_micro.compression: the import is made to fail
    # the way it fails there (the module is absent), in a child process of its own.
    script = ("import sys, tflite_micro; del tflite_micro.compression\n"
              "sys.modules['tflite_micro.compression'] = None\n"
              "from tflite_ext import lut\n"
              "try:\n    lut.compression_module()\n"
              "except Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120, check=True)
    assert proc.stdout.startswith("InputError lut=True needs TFLite Micro's compression tools "
                                  "(tflite_micro.compression, in tflite-micro wheels from 2025 "
                                  "on): pip install -U tflite-micro. Received: tflite-micro ")


def test_tflm_without_decode_kernel_is_one_line():
    # A runtime that lacks the decode kernel fails TFLM's op lookup; the same lookup fails for
    # a DECODE op under a name no runtime registers.
    small = lut_result().lut.flatbuffer.replace(b"TFLM_DECODE", b"TFLM_DECODX")
    with pytest.raises(InputError, match=r"^This TFLite Micro runtime cannot run the compressed "
                                         r"model: no kernel for CUSTOM:TFLM_DECODX"):
        lut.verify(lut_result().flatbuffer, small, clustered_qat()[0].x_test[:5])


def test_per_channel_quantized_weights_get_per_channel_tables():
    # Four shared values and every output column holding -1 and 1: PTQ gives each channel the
    # same scale, so the int8 tensor has 4 values in all. TFLM decodes one table for such a
    # per-channel-quantized FULLY_CONNECTED weight wrongly: plan() keeps to its quantized
    # axis, and verify() catches the wrong decode with real TFLM runs.
    rng = np.random.default_rng(0)
    kernel = rng.choice([-1.0, -0.5, 0.5, 1.0], size=(64, 16)).astype("float32")
    kernel[0], kernel[1] = -1.0, 1.0
    inputs = keras.Input((64,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(16, name="fc")(inputs))
    model.get_layer("fc").kernel.assign(kernel)
    x = rng.normal(size=(50, 64)).astype("float32")
    int8 = convert.to_tflite(model, x).flatbuffer
    (weights,) = int8_weights(int8).values()
    assert len(np.unique(weights)) == 4
    [entry] = lut.plan(int8)
    assert (entry["bits"], entry["axis"], entry["values"]) == (2, 0, 4)
    small, _ = lut.compress(int8)
    assert lut.verify(int8, small, x)["identical"]
    from tflite_micro import compression

    spec = compression.SpecBuilder()
    spec.add_tensor(0, entry["tensor"]).with_lut(2, compression.spec.PerTensor())
    wrong = bytes(compression.compress(int8, spec.build()))
    with pytest.raises(ConversionError, match=r"^LUT-compressed model differs from the int8 "
                                              r"model in TFLM on sample 0, output 0"):
        lut.verify(int8, wrong, x)
