"""The project's exception types.

Every message is one line that names the bad value and what was expected, e.g.
``TfliteExtError: sparsity must be in [0, 1). Received: sparsity=1.3``. The CLI prints
the message alone (no traceback) and exits with status 2.
"""


class TfliteExtError(Exception):
    """Base class: a user-facing error with a one-line, actionable message."""


class InputError(TfliteExtError, ValueError):
    """A bad argument, file or dataset given by the user."""


class ModelFileError(InputError):
    """A missing, empty, truncated or corrupt model file."""


class InvalidModelError(ModelFileError):
    """A .tflite whose tables, indices, sizes or quantization a runtime cannot trust."""


class ConversionError(TfliteExtError):
    """The TFLite converter failed or produced a model that breaks the requested contract."""


class UnsupportedLayerError(TfliteExtError, ValueError):
    """A layer the graph, pruning or quantization code does not know how to handle."""


class DeviceError(TfliteExtError):
    """adb, an Android device or a device-side binary did not behave as expected."""


class RunTimeout(DeviceError):
    """An adb command or benchmark run did not finish in time."""


class BenchmarkFailed(DeviceError):
    """benchmark_model ran but failed or printed no timings."""
