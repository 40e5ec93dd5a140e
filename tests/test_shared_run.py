"""The short run that the channel changes share (`compress.shared_run`)."""
import keras
import numpy as np
import pytest

from tflite_ext import pruning
from tflite_ext.compress import search, shared_run
from tflite_ext.errors import InputError
from tflite_ext.pruning.plan import pruning_wrappers
from tflite_ext.tasks import Split


@pytest.fixture(scope="module")
def bn_cnn(digits):
    """conv1-BN-ReLU-conv2-BN-ReLU-GAP-Dense on the 8x8 digits, trained briefly."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for name in ("conv1", "conv2"):
        x = keras.layers.Conv2D(16, 3, padding="same", name=name)(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=32, verbose=0)
    return model


def _changes(model, setting):
    return [search.Change("prune", pattern, setting, name)
            for name, pattern in search.prunable_groups(model)]


def test_channel_masks_are_those_of_the_one_shot_change(bn_cnn, digits):
    change = _changes(bn_cnn, 0.75)[0]  # conv1 and its BN: 4 of 16 channels kept
    masks = shared_run.channel_masks(bn_cnn, change, round_to=4)
    masked = pruning.prune(bn_cnn, 0.5)
    wrappers = pruning_wrappers(masked)
    assert [w.name for w in wrappers] == ["conv1", "conv2", "logits"]
    assert [(int(i.sum()), int(o.sum())) for i, o in masks] == [(1, 4), (4, 16), (16, 10)]
    for wrapper, (in_mask, out_mask) in zip(wrappers, masks):
        wrapper.in_mask.assign(in_mask)
        wrapper.out_mask.assign(out_mask)
    stripped = search.one_shot(bn_cnn, {change.key: change.setting}, round_to=4)  # BN as is
    x = digits.x_test[:64]
    np.testing.assert_allclose(masked.predict(x, verbose=0), stripped.predict(x, verbose=0),
                               atol=1e-5)


def test_the_slots_take_turns_for_their_steps_and_the_run_repeats(bn_cnn, digits,
                                                                  monkeypatch):
    changes = _changes(bn_cnn, 0.5)
    turns = []
    step = shared_run._Rotate.on_train_batch_begin

    def recorded(self, batch, logs=None):
        turns.append(self.step % len(self.slots))
        step(self, batch, logs)

    monkeypatch.setattr(shared_run._Rotate, "on_train_batch_begin", recorded)
    data = Split(digits.x_train[:320], digits.y_train[:320], digits.x_test[:0],
                 digits.y_test[:0], 10)
    before = [w.copy() for w in bn_cnn.get_weights()]
    run = [shared_run.shared_short_run(bn_cnn, changes, data, (digits.x_test, digits.y_test),
                                       steps_per_slot=5, learning_rate=1e-3)
           for _ in range(2)]
    # 5 steps each for the unchanged model and the 2 changes: 15 of an epoch's 10 steps, in turn
    assert turns == [i % 3 for i in range(15)] * 2
    reference, scores = run[0]
    assert set(scores) == set(changes) and 0.1 < reference <= 1.0
    assert run[0] == run[1]  # from the same seed, the same scores (the cache relies on it)
    for a, b in zip(before, bn_cnn.get_weights()):  # the teacher is left as it was
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", [search.Change("prune", "conv1", 1.0, "conv1"),
                                    search.Change("factorize", "logits", 0.5, "logits")])
def test_only_channel_changes_share_a_run(bn_cnn, change):
    with pytest.raises(InputError, match=f"channel changes.*Received: {change.label}$"):
        shared_run.channel_masks(bn_cnn, change)
