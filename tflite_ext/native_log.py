"""What native code (the MLIR converter, LiteRT, TFLite Micro) writes to fd 2, captured.

Their C++ logs bypass Python's `sys.stderr`: "INFO: Created TensorFlow Lite XNNPACK delegate
for CPU." on every interpreter, the converter's errors, TFLM's allocation report. Captured,
they become part of a one-line error when something fails and stay off the terminal when
nothing does.

Example:
    >>> with captured() as log:
    ...     interpreter = litert.Interpreter(model_content=data)
    >>> log()    # the text written meanwhile
    'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n'
"""
import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def captured():
    """Redirects fd 2 to a temporary file for the block; yields a function returning its text."""
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
