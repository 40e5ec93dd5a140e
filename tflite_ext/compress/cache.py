"""A resumable record of every measurement: one JSON object per line, appended as it is made.

An interrupted search reopens the file and skips what it already measured. Keys say what a
value depends on (the model's weights, the candidate, the target and, for host timings, the
CPU), so a changed model or machine measures again.

Example:
    >>> cache = Cache("build/compress/cache.jsonl")
    >>> cache.get_or_make("acc:abc:s2=0.5", lambda: 0.9815)
    0.9815
"""
import hashlib
import json
import os

import keras
import numpy as np


def fingerprint(value):
    """A short hash of bytes, or of a Keras model's architecture and weights."""
    digest = hashlib.sha256()
    if isinstance(value, (bytes, bytearray)):
        digest.update(value)
    else:
        digest.update(json.dumps(value.get_config(), sort_keys=True, default=str).encode())
        for w in value.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return digest.hexdigest()[:16]


class Cache:
    """{key: JSON value}, persisted in `path` (None: in memory only)."""

    def __init__(self, path=None):
        self.path, self.values = path, {}
        if path and os.path.exists(path):
            with open(path) as f:
                text = f.read()
            if text and not text.endswith("\n"):  # a killed run cut its last line short
                text = text[:text.rfind("\n") + 1]
                with open(path, "w") as f:
                    f.write(text)
            for line in text.splitlines():
                item = json.loads(line)
                self.values[item["key"]] = item["value"]

    def __contains__(self, key):
        return key in self.values

    def get(self, key):
        return self.values.get(key)

    def put(self, key, value):
        self.values[key] = value
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
        return value

    def get_or_make(self, key, make):
        return self.values[key] if key in self.values else self.put(key, make())

    def _blob_path(self, name):
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), "tflite",
                            f"{name}.tflite")

    def put_blob(self, name, data):
        """Keeps `data` (a candidate's .tflite) beside the cache, so another target reuses it."""
        if self.path:
            path = self._blob_path(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".part", "wb") as f:
                f.write(data)
            os.replace(path + ".part", path)

    def get_blob(self, name):
        """The bytes `put_blob` kept under `name`, or None."""
        if self.path and os.path.exists(self._blob_path(name)):
            with open(self._blob_path(name), "rb") as f:
                return f.read()
        return None
