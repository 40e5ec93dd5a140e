"""Safe file handling: inputs are checked before use, outputs appear whole or not at all.

Every temporary file or folder the project makes is named `.tmp-tflite_ext-<pid>-...` and sits
beside its final path (or in the temporary folder `private_tempdir` makes). An error, Ctrl-C
or a SIGTERM the CLI turns into an exception removes it (`try`/`finally`). SIGKILL cannot be
caught: the `.tmp-tflite_ext-<pid>-*` entry stays until the next write in that folder, which
removes the ones whose process is gone (`remove_stale_temps`).

Example:
    >>> from tflite_ext.files import atomic_write
    >>> atomic_write("build/model.tflite", flatbuffer_bytes)
"""
import contextlib
import os
import re
import shutil
import signal
import tempfile

from tflite_ext.errors import InputError, ModelFileError

TEMP_PREFIX = ".tmp-tflite_ext-"
_STALE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


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
    """Creates `path` if needed and checks, by writing a file there, that files can be written.

    `os.access` is not enough: root passes it on read-only file systems like /sys.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"Cannot create output folder ({e.strerror}). "
                         f"Received: {path!r}") from None
    if not os.path.isdir(path):
        raise InputError(f"Output folder is not writable (not a folder). Received: {path!r}")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=temp_prefix(), suffix="-probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"Output folder is not writable ({e.strerror}). "
                         f"Received: {path!r}") from None
    return path


def temp_prefix():
    """The name prefix of this process's temporary files: `.tmp-tflite_ext-<pid>-`."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder):
    """Removes the `.tmp-tflite_ext-<pid>-*` files and folders in `folder` left by processes
    that no longer run (killed with SIGKILL mid-write); returns their names.

    A process that still runs (or another user's) keeps its own: only dead pids' are removed.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _STALE.match(name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(name)
    return removed


@contextlib.contextmanager
def _signals_held():
    """Holds SIGINT and SIGTERM back for a few system calls (a rename pair): a signal then
    acts just after them, so it cannot land between them."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # not on Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data):
    """Writes bytes or str to `path` through a temporary file and a rename.

    An error, Ctrl-C or SIGTERM (under the CLI) mid-write removes the temporary file; a
    SIGKILL leaves `.tmp-tflite_ext-<pid>-*` beside `path`, removed by the next write there.
    `path` itself is never partial.
    """
    path = os.fspath(path)
    folder = ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    remove_stale_temps(folder)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(),
                               suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:  # a signal after the rename finds tmp gone: path is whole
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(path):
    """Yields a temporary folder beside `path`; when the block ends without an error it is
    renamed to `path`, replacing a folder already there. So `path` holds a complete set of
    files or is absent; never a partial set.

    Check that an existing `path` may be replaced before calling (`replaceable_folder`).
    Between the two renames of a replacement `path` is briefly absent (Ctrl-C and SIGTERM are
    held back there). An error, Ctrl-C or SIGTERM (under the CLI) removes the temporary
    folder; a SIGKILL leaves it as `.tmp-tflite_ext-<pid>-*` (a SIGKILL between the renames:
    the earlier output in one too), removed by the next `atomic_folder`/`atomic_write` there.

    Example:
        >>> with atomic_folder("build/demo") as tmp:
        ...     atomic_write(os.path.join(tmp, "report.json"), text)
    """
    path = os.path.abspath(os.fspath(path))
    parent = ensure_writable_dir(os.path.dirname(path))
    remove_stale_temps(parent)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(), suffix="-" + name)
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if os.path.isdir(path):
            old = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(), suffix="-old-" + name)
        with _signals_held():  # a Ctrl-C or SIGTERM waits until path is whole again
            if old:
                os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def replaceable_folder(path, allowed):
    """Checks that `path` is absent, an empty folder, or a folder holding only names for
    which `allowed(name)` is true (an earlier run's output); raises a one-line InputError
    otherwise, so a run never replaces a folder of the user's own files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return path
    if not os.path.isdir(path):
        raise InputError(f"Output folder path is a file. Received: {path!r}")
    foreign = sorted(n for n in os.listdir(path) if not allowed(n))
    if foreign:
        raise InputError(f"Output folder holds files this command did not write "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                         f"it would be replaced: pass a new or empty folder. Received: {path!r}")
    return path


@contextlib.contextmanager
def private_tempdir(beside):
    """Points `tempfile` (and $TMPDIR, for TensorFlow's C++ side) at a new folder
    `.tmp-tflite_ext-<pid>-work` in `beside`, removed when the block ends.

    Everything TensorFlow writes through `tempfile` (the converter's SavedModel, autograph's
    generated modules) lands there: a SIGKILL leaves it beside the output, not in the system
    temporary folder, and the next run there removes it.
    """
    folder = ensure_writable_dir(beside)
    remove_stale_temps(folder)
    work = tempfile.mkdtemp(dir=folder, prefix=temp_prefix(), suffix="-work")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = work, work
    try:
        yield work
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(work, ignore_errors=True)
