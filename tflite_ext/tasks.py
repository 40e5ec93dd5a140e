"""Reference tasks that work offline: scikit-learn's bundled handwritten digits.

Example:
    >>> from tflite_ext import tasks
    >>> data = tasks.digits()                 # 8x8x1 in [0, 1], the split of references.md
    >>> data.x_train.shape, data.x_test.shape
    ((1257, 8, 8, 1), (540, 8, 8, 1))
    >>> big = tasks.digits(size=32, channels=3)   # ResNet-8 input, upsampled and repeated
"""
import dataclasses

import numpy as np

from tflite_ext.errors import InputError


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test split of images (NHWC float32 in [0, 1]) and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self):
        return self.x_train.shape[1:]


def digits(size=8, channels=1, test_size=0.3, seed=0):
    """The 1,797 real 8x8 digits, split 70/30 stratified with `random_state=seed`.

    `size` upsamples by pixel repetition (size must be a multiple of 8); `channels` repeats the
    grey channel, so ResNet-8 (32x32x3) can train on the same real data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size % 8 or size <= 0:
        raise InputError(f"size must be a positive multiple of 8. Received: size={size}")
    bunch = load_digits()
    x = (bunch.images / 16.0).astype("float32")[..., None]
    if size != 8:
        x = x.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    if channels != 1:
        x = np.repeat(x, channels, axis=-1)
    y = bunch.target.astype("int32")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed)
    return Split(x_tr, y_tr, x_te, y_te, num_classes=10)


def validation_split(data, fraction, seed=0):
    """Holds out a stratified `fraction` of the *training* images as the evaluation set.

    For tuning a recipe without looking at the test set: the returned Split trains on the rest
    of the training data and its `x_test`/`y_test` are the held-out training images.
    `fraction=0` returns `data` unchanged.

    Example:
        >>> tune = validation_split(digits(), 0.2)     # 1005 train / 252 validation
    """
    if not fraction:
        return data
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in [0, 1). Received: fraction={fraction}")
    from sklearn.model_selection import train_test_split

    x_tr, x_val, y_tr, y_val = train_test_split(
        data.x_train, data.y_train, test_size=fraction, stratify=data.y_train,
        random_state=seed)
    return dataclasses.replace(data, x_train=x_tr, y_train=y_tr, x_test=x_val, y_test=y_val)
