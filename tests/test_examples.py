"""Every example runs end to end in its quick mode and writes what it promises."""
import os
import pathlib
import subprocess
import sys

import pytest

from tflite_ext import inspect

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, outputs", [
    ("qat_to_int8.py", ["digits_qat_int8.tflite"]),
    ("prune_and_strip.py", ["resnet8_pruned_int8.tflite"]),
    ("micro_export.py", ["ds_cnn.tflite", "ds_cnn.c", "ds_cnn.h"]),
])
def test_example_quick_mode(tmp_path, script, outputs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0
    assert inspect.summary(tmp_path / outputs[0])["full_integer"]
