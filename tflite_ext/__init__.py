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

_SUBMODULES = ("bench", "clustering", "compress", "convert", "demo", "distillation", "errors",
               "factorization", "files", "functional", "inspect", "lut", "models", "pruning",
               "quantization", "tasks", "wrapping")


def __getattr__(name):
    # Submodules load on first use, so `import tflite_ext` stays light (no TensorFlow import).
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"tflite_ext.{name}")
    raise AttributeError(f"module 'tflite_ext' has no attribute {name!r}")
