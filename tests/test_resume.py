"""An interrupted `fit` resumes with the same state (issue 16, item 3).

Each case (channel pruning on a ramp, QAT with ranges still moving when the fit stops,
clustering with assignments refreshed on a schedule, pruning and QAT in one fit) is trained
three ways on the same initial weights and data order (`shuffle=False`), 12 steps (4 epochs
of 3 batches):

- straight through: the reference;
- interrupted at step 8 (mid-epoch 3) with `keras.callbacks.BackupAndRestore` and a
  `keras.callbacks.ModelCheckpoint` writing a `.keras` file every epoch, then resumed two
  ways: a fresh model with the *same* callback objects and the backup (as Keras' own
  BackupAndRestore tests do: a callback's Python counters are 2 steps ahead of the state
  restored from the end of epoch 2), and `keras.models.load_model` of the checkpoint with
  fresh callbacks and `initial_epoch=2`.

Each schedule has an event between the restore point (step 6) and the end, so a callback
that counts steps from its own start (or keeps counting past the restore point) acts at the
wrong step: pruning steps at 8 and 10, the QAT freeze at 9, cluster refreshes at 8 and 12.

Bounds: masks, steps, observer flags and cluster assignments exactly equal; weights,
centroids, quantization ranges, BN statistics and optimizer moments within 1e-6 (measured:
identical on the 2-core test machine).
"""
import keras
import numpy as np
import pytest

from clustering_models import float_model
from tflite_ext import clustering, models, pruning
from tflite_ext.quantization import FreezeQuantization, quantize_model

SAMPLES, BATCH, EPOCHS = 96, 32, 4        # 3 steps an epoch, 12 in all
STOP_STEP = 8                             # interrupted mid-epoch 3; backups are from step 6
EXACT = ("in_mask", "out_mask", "weight_mask", "pruning_step", "observed", "observing",
         "bn_observing", "iteration", "kernel_assignments", "kernel_pinned")
BOUND = 1e-6


def _prune(model):
    # Prunes at steps 0, 2, ..., 10: 0.3 at the restore point, 0.5 at the end.
    schedule = pruning.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, power=1,
                                       frequency=2)
    return pruning.prune(model, schedule)


CASES = {
    "prune": (_prune, lambda: [pruning.PruningCallback()]),
    "qat": (quantize_model, lambda: [FreezeQuantization(9)]),
    "cluster": (lambda m: clustering.cluster(m, {"conv2": 4, "logits": 8},
                                             per_channel={"conv2": True}, init="linear"),
                lambda: [clustering.ClusteringCallback(update_every=4)]),
    "prune_qat": (lambda m: quantize_model(_prune(m)),
                  lambda: [pruning.PruningCallback(), FreezeQuantization(9)]),
}


class _Interrupted(Exception):
    pass


class _StopAt(keras.callbacks.Callback):
    """Raises after `step` training steps: a worker dying mid-epoch."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise _Interrupted()


@pytest.fixture(scope="module")
def data(digits):
    keras.utils.set_random_seed(0)
    weights = float_model().get_weights()
    return weights, digits.x_train[:SAMPLES], digits.y_train[:SAMPLES]


def _made(case, weights):
    base = float_model()
    base.set_weights(weights)
    model = models.compile_classifier(CASES[case][0](base), 1e-3)
    model(keras.ops.zeros((1, 8, 8, 1)))  # built: BackupAndRestore restores into it
    return model


def _fit(model, x, y, callbacks, initial_epoch=0):
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=callbacks, initial_epoch=initial_epoch)


def _state(model):
    """[(name, value)] of the model's variables, then its optimizer's (named by position:
    a loaded model's optimizer names its slots after other paths)."""
    assert model.optimizer.variables[0] is model.optimizer.iterations
    named = [(v.name, v) for v in model.variables]
    named += [("iteration" if i == 0 else f"optimizer_{i}", v)
              for i, v in enumerate(model.optimizer.variables)]
    return [(name, keras.ops.convert_to_numpy(v)) for name, v in named]


def _assert_same(expected, actual):
    """Every variable exactly equal (EXACT) or within BOUND; returns the largest difference."""
    assert [n for n, _ in actual] == [n for n, _ in expected]
    largest = 0.0
    for (name, want), (_, got) in zip(expected, actual):
        assert got.shape == want.shape, name
        if name in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=BOUND, err_msg=name)
        if got.size:
            largest = max(largest, float(np.max(np.abs(got.astype(np.float64) - want))))
    return largest


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_fit_resumes_to_the_same_state(case, data, tmp_path):
    weights, x, y = data
    reference = _made(case, weights)
    _fit(reference, x, y, CASES[case][1]())
    want = _state(reference)

    backup, checkpoint = str(tmp_path / "backup"), str(tmp_path / "last.keras")
    callbacks = CASES[case][1]()
    with pytest.raises(_Interrupted):
        _fit(_made(case, weights), x, y, callbacks + [
            keras.callbacks.BackupAndRestore(backup),
            keras.callbacks.ModelCheckpoint(checkpoint), _StopAt(STOP_STEP)])

    # 1. A fresh model, the same callback objects (their Python state is ahead), the backup.
    resumed = _made(case, weights)
    _fit(resumed, x, y, callbacks + [keras.callbacks.BackupAndRestore(backup)])
    backup_diff = _assert_same(want, _state(resumed))

    # 2. The .keras checkpoint of epoch 2, fresh callbacks, initial_epoch=2.
    loaded = keras.models.load_model(checkpoint)
    assert int(loaded.optimizer.iterations.numpy()) == 6
    _fit(loaded, x, y, CASES[case][1](), initial_epoch=2)
    checkpoint_diff = _assert_same(want, _state(loaded))
    print(case, f"largest difference: backup {backup_diff:.1e}, checkpoint {checkpoint_diff:.1e}")

    # Not vacuous: every schedule acted after the restore point.
    names = dict(want)
    assert int(names["iteration"]) == EPOCHS * SAMPLES // BATCH
    if "prune" in case:
        masks = [v for n, v in want if n == "out_mask"]
        assert sorted(int(np.sum(m == 0)) for m in masks) == [0, 4, 8]   # 50% of 8 and 16
        assert {int(v) for n, v in want if n == "pruning_step"} == {12}
    if "qat" in case:
        assert {float(v) for n, v in want if n == "observing"} == {0.0}  # frozen at step 9
