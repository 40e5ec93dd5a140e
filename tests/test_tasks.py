"""tflite_ext.tasks: the offline digits split and the validation split used for tuning."""
import numpy as np
import pytest

from tflite_ext import tasks
from tflite_ext.errors import InputError


def test_digits_split_shapes_and_range():
    data = tasks.digits()
    assert data.x_train.shape == (1257, 8, 8, 1) and data.x_test.shape == (540, 8, 8, 1)
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    big = tasks.digits(32, 3)
    assert big.input_shape == (32, 32, 3)
    # Pixel repetition: every 4x4 block of the 32x32 image is one 8x8 pixel, on each channel.
    np.testing.assert_array_equal(big.x_train[:, ::4, ::4, 2:3], data.x_train)


def test_validation_split_holds_out_training_images_only():
    data = tasks.digits()
    tune = tasks.validation_split(data, 0.2)
    assert len(tune.x_train) == 1005 and len(tune.x_test) == 252
    # Every held-out image is a training image (the test split stays untouched).
    train_rows = {row.tobytes() for row in data.x_train}
    assert {row.tobytes() for row in tune.x_test} <= train_rows
    assert {row.tobytes() for row in tune.x_train} <= train_rows
    assert len(tune.x_train) + len(tune.x_test) == len(data.x_train)
    # Stratified: each class's share of the held-out set is within one image of 20%.
    counts = np.bincount(data.y_train, minlength=10)
    assert np.all(np.abs(np.bincount(tune.y_test, minlength=10) - 0.2 * counts) <= 1)
    assert tasks.validation_split(data, 0) is data


def test_validation_split_rejects_bad_fraction():
    with pytest.raises(InputError, match=r"fraction must be in \[0, 1\). Received: fraction=1.5"):
        tasks.validation_split(tasks.digits(), 1.5)
