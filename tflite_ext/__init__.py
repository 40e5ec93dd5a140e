"""tflite_ext: smaller, faster, verified full-integer TFLite models from Keras 3.

Example:
    >>> import tflite_ext as tx
    >>> result = tx.convert.to_tflite(model, representative_data=x_train[:200])
    >>> tx.inspect.summary(result.flatbuffer)["full_integer"]
    True
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tflite_ext")  # setup.py is the one place the version is written
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
