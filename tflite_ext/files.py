"""Safe file handling: inputs are checked before use, outputs appear whole or not at all.

Example:
    >>> from tflite_ext.files import atomic_write
    >>> atomic_write("build/model.tflite", flatbuffer_bytes)
"""
import os
import tempfile

from tflite_ext.errors import InputError, ModelFileError


def read_model_bytes(path):
    """Returns the bytes of an existing, non-empty file, or raises a one-line ModelFileError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"Model file not found. Received: path={path!r}")
    if os.path.isdir(path):
        raise ModelFileError(f"Expected a model file, got a directory. Received: path={path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelFileError(f"Cannot read model file ({e.strerror}). Received: path={path!r}") \
            from None
    if not data:
        raise ModelFileError(f"Model file is empty (0 bytes). Received: path={path!r}")
    return data


def ensure_writable_dir(path):
    """Creates `path` if needed and checks that files can be written in it."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"Cannot create output folder ({e.strerror}). "
                         f"Received: {path!r}") from None
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"Output folder is not writable. Received: {path!r}")
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data):
    """Writes bytes or str to `path` through a temporary file and a rename.

    A crash or an error mid-write leaves no partial file behind.
    """
    path = os.fspath(path)
    folder = ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
