"""The tfmot side of the peer comparison, run only as a subprocess of tools/compare.py.

tfmot 0.8 works only with legacy tf_keras (`TF_USE_LEGACY_KERAS=1`), which must never be
imported next to Keras 3. So tools/compare.py trains the float Keras 3 model, writes its weights
and the data to .npz files plus a JSON spec, and launches this script with its own environment.
Here the same architecture is rebuilt in tf_keras, the weights are loaded by layer name (and
checked against the parent's logits), tfmot prunes or quantizes with the given budget, and each
result is converted to a full-int8 .tflite with the same representative data. The parent
evaluates and times every .tflite itself.

compare.py runs it with its own interpreter, environment and working directory, so this process
imports the same tflite_ext (only `tflite_ext.files`, which needs no Keras).

Example (what compare.py runs):
    TF_USE_LEGACY_KERAS=1 python tools/tfmot_peer.py --spec build/compare/digits_cnn/peer_spec.json
"""
import json
import os
import sys
import time

from absl import app, flags

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("tools/tfmot_peer.py must run with TF_USE_LEGACY_KERAS=1 (tools/compare.py sets it).")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

from tflite_ext.files import atomic_write  # noqa: E402  (stdlib-only module: no Keras 3 import)

flags.DEFINE_string("spec", None, "JSON written by tools/compare.py.")
flags.mark_flag_as_required("spec")
FLAGS = flags.FLAGS
layers = tf_keras.layers


# --- The reference architectures, layer for layer and name for name as tflite_ext/models.py. ---

def digits_cnn(input_shape=(8, 8, 1), num_classes=10):
    inputs = tf_keras.Input(input_shape, name="image")
    x = layers.Conv2D(64, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(128, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf_keras.Model(inputs, outputs, name="digits_cnn")


def _conv_bn(x, filters, kernel, strides, name, relu=True):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same",
                      kernel_regularizer=tf_keras.regularizers.l2(1e-4), name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def resnet8(input_shape=(32, 32, 3), num_classes=10):
    inputs = tf_keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, 16, 3, 1, "stem")
    for i, (filters, strides) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        y = _conv_bn(x, filters, 3, strides, f"s{i}a")
        y = _conv_bn(y, filters, 3, 1, f"s{i}b", relu=False)
        if strides != 1:
            x = layers.Conv2D(filters, 1, strides=strides, padding="same",
                              kernel_regularizer=tf_keras.regularizers.l2(1e-4),
                              name=f"s{i}_shortcut")(x)
        x = layers.Add(name=f"s{i}_add")([x, y])
        x = layers.ReLU(name=f"s{i}_out")(x)
    x = layers.AveragePooling2D(pool_size=x.shape[1], name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf_keras.Model(inputs, outputs, name="resnet8")


BUILDERS = {"digits_cnn": digits_cnn, "resnet8": resnet8}


def load_weights_by_name(model, path):
    """Sets each layer's weights from `<layer name>/<index>` arrays; every array must be used."""
    arrays = dict(np.load(path))
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        values = [arrays[f"{layer.name}/{i}"] for i in range(len(layer.weights))]
        layer.set_weights(values)
        used.update(f"{layer.name}/{i}" for i in range(len(values)))
    unused = sorted(set(arrays) - used)
    if unused:
        raise ValueError(f"Weights not matched to any tf_keras layer. Received: {unused[:5]}")


def compile_classifier(model, learning_rate):
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def to_int8_tflite(model, representative=None):
    """Full-integer conversion, int8 I/O, batch 1: the settings tflite_ext.convert uses.

    A QAT model carries its own ranges (fake-quant ops): no representative data, as tfmot
    documents; a pruned float model is calibrated on `representative`.
    """
    spec = tf.TensorSpec([1, *model.inputs[0].shape[1:]], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(x):
        return model(x, training=False)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def gen():
        for sample in representative:
            yield [sample[None].astype("float32")]

    if representative is not None:
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # (Without calibration data the INT8-only op set makes the converter demand a
    # representative_dataset before it has looked for fake-quant ops; the parent verifies
    # that the QAT result is full integer instead.)
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def keras_accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


class EpochPrinter(tf_keras.callbacks.Callback):
    """One progress line per epoch, as tflite_ext.bench.variants.EpochLog writes it (a tf_keras
    callback: that one is Keras 3); the parent relays it with a [tfmot] prefix."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        print(f"{self.label}: epoch {epoch + 1}/{self.params['epochs']}  "
              f"loss {logs.get('loss', 0):.4f}  accuracy {logs.get('accuracy', 0):.4f}  "
              f"({time.perf_counter() - self.start:.0f} s)", flush=True)


def run_prune(base, spec, variant, data):
    """prune_low_magnitude with PolynomialDecay 0 -> sparsity, fine-tune, strip_pruning."""
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=variant["sparsity"],
        begin_step=0, end_step=variant["end_step"], frequency=variant.get("frequency", 100))
    model = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
    compile_classifier(model, variant["lr"])
    model.fit(data["x_train"], data["y_train"], epochs=variant["epochs"],
              batch_size=spec["batch_size"], verbose=0,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep(),
                         EpochPrinter(variant["name"])])
    stripped = tfmot.sparsity.keras.strip_pruning(model)
    kernels = [w.numpy() for w in stripped.weights if "kernel" in w.name]
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    total = sum(k.size for k in kernels)
    return stripped, {"kernel_sparsity": zeros / total}


def run_qat(base, spec, variant, data):
    """quantize_model (tfmot's default 8-bit scheme), fine-tune."""
    model = tfmot.quantization.keras.quantize_model(base)
    compile_classifier(model, variant["lr"])
    model.fit(data["x_train"], data["y_train"], epochs=variant["epochs"],
              batch_size=spec["batch_size"], verbose=0,
              callbacks=[EpochPrinter(variant["name"])])
    return model, {}


def run_cluster(base, spec, variant, data):
    """cluster_weights (k-means++ centroids, tfmot's default), fine-tune, strip_clustering."""
    cl = tfmot.clustering.keras
    model = cl.cluster_weights(
        base, number_of_clusters=variant["clusters"],
        cluster_centroids_init=cl.CentroidInitialization.KMEANS_PLUS_PLUS)
    compile_classifier(model, variant["lr"])
    model.fit(data["x_train"], data["y_train"], epochs=variant["epochs"],
              batch_size=spec["batch_size"], verbose=0,
              callbacks=[EpochPrinter(variant["name"])])
    stripped = cl.strip_clustering(model)
    kernels = [w.numpy() for w in stripped.weights if "kernel" in w.name]
    return stripped, {"max_distinct_per_kernel": max(len(np.unique(k)) for k in kernels)}


RUNNERS = {"prune": run_prune, "qat": run_qat, "cluster": run_cluster}


def main(argv):
    del argv  # flags only
    with open(FLAGS.spec) as f:
        spec = json.load(f)
    data = dict(np.load(spec["data"]))
    result = {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
              "tfmot": tfmot.__version__, "variants": {}}

    # The loaded tf_keras model must compute what the parent's Keras 3 model computes.
    check = BUILDERS[spec["model"]](input_shape=tuple(data["x_test"].shape[1:]))
    load_weights_by_name(check, spec["weights"])
    logits = check.predict(data["x_test"], batch_size=256, verbose=0)
    result["float_max_abs_logit_diff"] = float(np.max(np.abs(logits - data["ref_logits"])))
    result["float_keras_accuracy"] = keras_accuracy(check, data["x_test"], data["y_test"])
    print(f"weights loaded; max |logit diff| vs Keras 3 = {result['float_max_abs_logit_diff']:.2e}",
          flush=True)

    for variant in spec["variants"]:
        tf_keras.utils.set_random_seed(spec["seed"])
        base = BUILDERS[spec["model"]](input_shape=tuple(data["x_test"].shape[1:]))
        load_weights_by_name(base, spec["weights"])
        start = time.perf_counter()
        model, extra = RUNNERS[variant["kind"]](base, spec, variant, data)
        train_seconds = time.perf_counter() - start
        calibration = None if variant["kind"] == "qat" else data["representative"]
        flatbuffer = to_int8_tflite(model, calibration)
        path = os.path.join(spec["out"], f"{variant['name']}.tflite")
        atomic_write(path, flatbuffer)
        result["variants"][variant["name"]] = {
            "tflite": path, "keras_accuracy": keras_accuracy(model, data["x_test"], data["y_test"]),
            "train_seconds": round(train_seconds, 1), "config": variant, **extra}
        print(f"{variant['name']}: wrote {path} ({len(flatbuffer):,} bytes, "
              f"{train_seconds:.0f} s fine-tune)", flush=True)
        tf_keras.backend.clear_session()

    atomic_write(spec["result"], json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
