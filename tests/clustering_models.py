"""A small clustered QAT model and its int8 and LUT flatbuffers, built once per test session.

Shared by test_clustering, test_convert, test_inspect, test_bench_micro and test_cli (a plain
cache rather than a fixture, so that every test module reuses the one model).
"""
import functools

import keras

from tflite_ext import clustering, convert, models, tasks
from tflite_ext.quantization import FreezeQuantization, quantize_model

CLUSTERS = {"conv2": 4, "logits": 8}  # conv1 (72 weights) is left as it is


def float_model():
    """conv1(8)-BN-ReLU, conv2(16, relu), MaxPool, Flatten, logits: 1,152 conv2 weights (72
    per output channel) and 2,560 logits weights."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="small")


@functools.lru_cache(maxsize=None)
def clustered_qat():
    """(data, float model, clustered QAT model after 2 epochs, its strip_clustering)."""
    data = tasks.digits()
    keras.utils.set_random_seed(0)
    model = models.compile_classifier(float_model(), 3e-3)
    model.fit(data.x_train, data.y_train, epochs=4, batch_size=32, verbose=0)
    clustered = clustering.cluster(quantize_model(model), CLUSTERS, per_channel={"conv2": True},
                                   init="linear")
    models.compile_classifier(clustered, 3e-4)
    clustered.fit(data.x_train, data.y_train, epochs=2, batch_size=32, verbose=0,
                  callbacks=[clustering.ClusteringCallback(20), FreezeQuantization(60)])
    return data, model, clustered, clustering.strip_clustering(clustered)


@functools.lru_cache(maxsize=None)
def lut_result():
    """`convert.to_tflite(stripped, lut=True)`, proven on the first 200 test images."""
    data, _, _, final = clustered_qat()
    return convert.to_tflite(final, lut=True, lut_data=data.x_test[:200])
