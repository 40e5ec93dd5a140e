"""Trains the library's wrappers under `tf.distribute` and writes their state to an `.npz`.

`tests/test_distribute.py` runs it in fresh processes (the host CPU must be split into
logical devices before TensorFlow starts):

- `--mode mirrored --devices 2`: each case twice on the same data in the same order, on one
  device (no strategy) and under `MirroredStrategy` over two logical CPUs, with the same
  global batch. Keys `CASE/one/INDEX/NAME` and `CASE/mirrored/INDEX/NAME` (variables in
  model order), plus `CASE/mirrored/_spread` (the largest difference between two replicas'
  copies of any variable: 0 when every copy moved alike) and `CASE/NAME/_moved` (weights a
  `ClusteringCallback` moved between clusters; 0 in the other cases).
- `--mode multiworker`: one worker of a `MultiWorkerMirroredStrategy` cluster (`TF_CONFIG`
  from the environment). Each case is interrupted after `--stop_epoch` epochs of a fit
  with `keras.callbacks.BackupAndRestore`; then a fresh model resumes from the backup and
  finishes the fit. Keys `CASE/resumed/INDEX/NAME`, `CASE/resumed/_spread`,
  `CASE/resumed/_initial_epoch` (the epoch the resumed fit started at) and `_replicas`.
  The test compares it with the mirrored mode's one-device run of the same case.

A case is a `Case` in `CASES`: how to make the compiled model from the float one and its
callbacks; the variables compared are the trained model's (a Distiller's student). Adding
one is one entry there and one name in `MIRRORED_CASES` (and `MULTIWORKER_CASES`).

Usage:
    python tools/distributed_worker.py --mode mirrored --devices 2 --out /tmp/m.npz
    TF_CONFIG='{"cluster": {"worker": ["localhost:2222", "localhost:2223"]},
                "task": {"type": "worker", "index": 0}}' \\
        python tools/distributed_worker.py --mode multiworker --out /tmp/w0.npz
"""
import dataclasses
import os
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # one summation order: comparable runs

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("mode", "mirrored", ["mirrored", "multiworker"], "Which strategy to run.")
flags.DEFINE_integer("devices", 2, "Logical CPU devices (mirrored mode).", lower_bound=1)
flags.DEFINE_list("cases", None, "Cases to run (default: all of the mode's).")
flags.DEFINE_integer("samples", 128, "Training images (the first ones, in order).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", 3, "Epochs per fit.", lower_bound=1)
flags.DEFINE_integer("stop_epoch", 2, "Multi-worker: epochs before the interruption.",
                     lower_bound=1)
flags.DEFINE_string("out", None, "Output .npz.", required=True)
FLAGS = flags.FLAGS


class Interrupted(Exception):
    """Raised after `--stop_epoch` epochs: the stand-in for a worker dying mid-training."""


def _keras():
    import keras

    return keras


def float_model():
    """Conv(8)-BN-ReLU-Conv(16)-ReLU-GAP-Dense(10) on 8x8x1. BN is `synchronized` so that its
    batch statistics are the global batch's on several replicas, as on one device."""
    keras = _keras()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))


def _schedule():
    from tflite_ext import pruning

    # 4 steps an epoch at the defaults: masks change at steps 0, 2, 4, 6 and 8.
    return pruning.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=8, power=1, frequency=2)


def _compiled(model):
    keras = _keras()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _prune(model, **kwargs):
    from tflite_ext import pruning

    return _compiled(pruning.prune(model, _schedule(), **kwargs))


def _qat(model):
    from tflite_ext.quantization import quantize_model

    return _compiled(quantize_model(model))


def _prune_qat(model):
    from tflite_ext import pruning
    from tflite_ext.quantization import quantize_model

    # Ranked by mean |activation|: the sums QuantizeWrapper records for its PruneWrapper.
    return _compiled(quantize_model(pruning.prune(model, _schedule(),
                                                  importance="mean_activation")))


def _distill(model):
    keras = _keras()
    from tflite_ext import distillation, pruning

    student = pruning.prune(model, _schedule())
    return distillation.distill(model, student, optimizer=keras.optimizers.SGD(0.05),
                                metrics=None)


def _cluster(model):
    from tflite_ext import clustering

    # Per output channel for the convs (k-means++ per channel), per tensor for the logits.
    return _compiled(clustering.cluster(model, {"c1": 4, "c2": 4, "logits": 8},
                                        per_channel={"c.*": True}))


def _pruning_callbacks():
    from tflite_ext import pruning

    return [pruning.PruningCallback()]


def _qat_callbacks():
    from tflite_ext.quantization import FreezeQuantization

    return [FreezeQuantization(6)]  # ranges move for 6 steps, then stay


def _prune_qat_callbacks():
    return _pruning_callbacks() + _qat_callbacks()


def _cluster_callbacks():
    from tflite_ext import clustering

    # 4 steps an epoch at the defaults: assignments refresh at steps 3, 6, 9 and 12.
    return [clustering.ClusteringCallback(update_every=3)]


@dataclasses.dataclass(frozen=True)
class Case:
    """make(float model) -> compiled model; callbacks() -> fresh callbacks."""
    make: Callable
    callbacks: Callable = list


CASES = {
    # Channel pruning ranked by mean |activation|: per-feature sums accumulated in `call`.
    "prune_activation": Case(lambda m: _prune(m, importance="mean_activation"),
                             _pruning_callbacks),
    "prune_l2": Case(lambda m: _prune(m, round_to=2), _pruning_callbacks),
    "prune_unstructured": Case(lambda m: _prune(m, granularity="unstructured"),
                               _pruning_callbacks),
    "qat": Case(_qat, _qat_callbacks),  # moving activation ranges, folded BN statistics
    "prune_qat": Case(_prune_qat, _prune_qat_callbacks),
    "distill_prune": Case(_distill, _pruning_callbacks),
    # Trainable centroids, latent kernels (straight-through gradient), refreshed assignments.
    "cluster": Case(_cluster, _cluster_callbacks),
}
# What the test runs, two cases for time: `prune_qat` covers the activation sums, ranges and
# folded BN statistics (and so `prune_activation` and `qat`), `distill_prune` L2 pruning (and
# so `prune_l2`). `prune_unstructured` was run by hand: masks identical, weights within 4e-8.
MIRRORED_CASES = ("prune_qat", "distill_prune", "cluster")
MULTIWORKER_CASES = ("prune_qat", "cluster")


def trained_model(model):
    """The model whose variables a case compares: a Distiller's student, else `model`."""
    from tflite_ext.distillation import student_of

    return student_of(model)


def state(model, prefix):
    """{prefix/variable path: value} of the trained model, and `prefix/_spread`."""
    import numpy as np

    out, spread = {}, 0.0
    # Keyed by position and name: Keras numbers unnamed layers per process (input_layer_7).
    for i, v in enumerate(trained_model(model).variables):
        out[f"{prefix}/{i:03d}/{v.name}"] = np.asarray(v.numpy())
        copies = getattr(v.value, "values", None)  # a MirroredVariable's per-replica copies
        if copies:
            first = np.asarray(copies[0])
            spread = max([spread] + [float(np.max(np.abs(np.asarray(c, np.float64) - first)))
                                     for c in copies[1:]])
    out[f"{prefix}/_spread"] = np.float64(spread)
    return out


def _data():
    from tflite_ext import tasks

    data = tasks.digits()
    return data.x_train[:FLAGS.samples], data.y_train[:FLAGS.samples]


def _build(case, strategy, weights):
    """The case's model made from the float model (with `weights`) inside `strategy`."""
    keras = _keras()
    with strategy.scope():
        base = float_model()
        base.set_weights(weights)
        model = CASES[case].make(base)
        model(keras.ops.zeros((1, 8, 8, 1)))  # built: BackupAndRestore needs it
    return model


def _fit(model, x, y, callbacks, epochs):
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=epochs, shuffle=False, verbose=0,
              callbacks=callbacks)


def _moved(callbacks):
    """Weights the `ClusteringCallback`s among `callbacks` moved between clusters."""
    import numpy as np

    return np.int64(sum(getattr(c, "moved", 0) for c in callbacks))


def run_mirrored(cases, weights, x, y):
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    mirrored = tf.distribute.MirroredStrategy(devices)
    out = {}
    for case in cases:
        for name, strategy in (("one", tf.distribute.get_strategy()), ("mirrored", mirrored)):
            start = time.time()
            model = _build(case, strategy, weights)
            callbacks = CASES[case].callbacks()
            _fit(model, x, y, callbacks, FLAGS.epochs)
            out.update(state(model, f"{case}/{name}"))
            out[f"{case}/{name}/_moved"] = _moved(callbacks)
            print(f"{case} {name}: {time.time() - start:.1f} s", flush=True)
    return out


def _stop_after(epochs):
    keras = _keras()

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == epochs:
                raise Interrupted(f"stopped after epoch {epoch + 1}")
    return Stop()


def multi_worker_strategy():
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes a nested structure.

    Keras 3.15's `fit` does not run on a plain MultiWorkerMirroredStrategy
    (keras-team/keras#20585, tensorflow/tensorflow#72388), in two places:

    - before training it reduces the whole `(x, y)` batch in one `strategy.reduce` call (to
      build the model symbolically); this strategy reduces one value at a time and fails with
      "Attempt to convert a value (PerReplica...) to a Tensor";
    - it averages each step's scalar logs (the loss) with `reduce("MEAN", v, axis=0)`, which
      fails with "Invalid reduction dimension 0 for input with 0 dimensions".

    This subclass reduces value by value, as MirroredStrategy does, and a scalar over the
    replicas only (axis None).
    """
    import tensorflow as tf

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                local = self.experimental_local_results(v)
                scalar = axis is not None and all(t.shape.rank == 0 for t in local)
                return super(Strategy, self).reduce(reduce_op, v, None if scalar else axis)
            return tf.nest.map_structure(one, value)

    return Strategy()


def run_multiworker(strategy, cases, weights, x, y, out_path):
    import json

    import numpy as np

    keras = _keras()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    out = {"_replicas": np.int64(strategy.num_replicas_in_sync)}
    folder = os.path.dirname(os.path.abspath(out_path))
    for case in cases:
        # Each worker backs up to its own folder: Keras 3's BackupAndRestore writes plain
        # files, and two workers writing one file would race.
        backup = os.path.join(folder, f"backup_{case}_worker{task}")
        start = time.time()
        model = _build(case, strategy, weights)
        # BackupAndRestore after the case's callbacks: they must not depend on the order.
        try:
            _fit(model, x, y, CASES[case].callbacks() + [
                keras.callbacks.BackupAndRestore(backup), _stop_after(FLAGS.stop_epoch)],
                FLAGS.epochs)
            raise AssertionError("the interruption did not happen")
        except Interrupted:
            pass
        print(f"worker {task} {case}: interrupted at {time.time() - start:.1f} s", flush=True)
        resumed = _build(case, strategy, weights)  # a fresh model: its state comes from disk
        epochs = keras.callbacks.History()
        callbacks = CASES[case].callbacks()
        _fit(resumed, x, y, callbacks + [keras.callbacks.BackupAndRestore(backup), epochs],
             FLAGS.epochs)
        out.update(state(resumed, f"{case}/resumed"))
        out[f"{case}/resumed/_moved"] = _moved(callbacks)
        out[f"{case}/resumed/_initial_epoch"] = np.int64(min(epochs.epoch))
        print(f"worker {task} {case}: resumed at epoch {min(epochs.epoch)}, done at "
              f"{time.time() - start:.1f} s", flush=True)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    import tensorflow as tf

    strategy = None
    if FLAGS.mode == "multiworker":  # before any other TensorFlow work (collectives)
        strategy = multi_worker_strategy()
    elif FLAGS.devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.devices)
    import numpy as np

    keras = _keras()
    keras.utils.set_random_seed(0)
    weights = float_model().get_weights()  # one initialisation for every run
    x, y = _data()
    default = MIRRORED_CASES if FLAGS.mode == "mirrored" else MULTIWORKER_CASES
    cases = FLAGS.cases or list(default)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if FLAGS.mode == "mirrored":
        out = run_mirrored(cases, weights, x, y)
    else:
        out = run_multiworker(strategy, cases, weights, x, y, FLAGS.out)
    tmp = FLAGS.out + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
