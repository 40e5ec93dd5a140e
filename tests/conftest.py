"""Shared fixtures: small real models, trained briefly on the real digits data."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tflite_ext import tasks  # noqa: E402


def pytest_configure(config):
    # TensorFlow and Keras emit hundreds of deprecation notices about their own internals.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")


@pytest.fixture(scope="session")
def digits():
    return tasks.digits()


def tiny_cnn(filters=4):
    """Conv(4,3x3)-ReLU-MaxPool-Flatten-Dense(10): 2,304 + 640 MACs on 8x8x1, exactly."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


@pytest.fixture(scope="session")
def trained_tiny(digits):
    """tiny_cnn trained for 5 epochs: about 90% test accuracy, enough to compare int8 to float."""
    keras.utils.set_random_seed(0)
    model = tiny_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(digits.x_train, digits.y_train, epochs=5, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def tiny_int8(trained_tiny, digits):
    from tflite_ext import convert

    return convert.to_tflite(trained_tiny, digits.x_train[:200])


def assert_no_partial_files(folder):
    """Nothing half-written: no temporary files left in `folder`."""
    leftovers = [f for f in os.listdir(folder) if f.startswith(".tmp-")]
    assert leftovers == [], leftovers


def keras_top1(model, x):
    return np.argmax(model.predict(x, verbose=0), axis=-1)
