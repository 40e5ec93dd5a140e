"""Outputs are whole or absent, and no temporary file outlives a run (issue 16).

`tflite-ext convert` and `tflite-ext demo` are killed (SIGTERM and SIGKILL) at random moments
by tools/kill_outputs.py (run here with a few kills; run it with --kills 50 for the figures),
and the `files` helpers they rely on are checked directly.
"""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from tflite_ext import files
from tflite_ext.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = re.compile(r"\.tmp-tflite_ext-(\d+)-")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_convert_and_demo_leave_no_partial_output_nor_temp_files(tmp_path):
    seed = random.randrange(10**6)  # random moments; the seed is in every failure message
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "kill_outputs.py"),
                           "--kills", "4", "--seed", str(seed), "--max_delay", "12",
                           "--final_kill", "5", "--work", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    trials = result["trials"]
    assert [(t["command"]) for t in trials] == ["convert", "demo"] * 2
    for t in trials:
        where = f"seed {seed}: {t}"
        assert t["output"] in ("absent", "complete"), where
        assert t["left_in_tmpdir"] == [], where  # TensorFlow's files went beside the output
        if t["signal"] == "SIGKILL":  # cannot be caught: leftovers named, for the next run
            assert all(_OURS.match(n) for n in t["left_beside_output"]), where
        else:  # SIGTERM or finished: every temporary file removed
            assert t["left_beside_output"] == [], where
    for command, final in result["final"].items():  # the next run removed SIGKILL's leftovers
        assert final["left_beside_output"] == [] and final["left_in_tmpdir"] == [], \
            f"seed {seed}: {command} {final}"
    assert sorted(os.listdir(tmp_path)) == ["calib.npy", "model.keras", "out_convert",
                                            "out_demo", "tmp"]


def test_atomic_write_interrupted_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "m.tflite"
    target.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt  # what the CLI's SIGTERM handler raises, at the worst moment

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, b"new")
    assert os.listdir(tmp_path) == ["m.tflite"] and target.read_bytes() == b"old"


def test_stale_temps_of_dead_processes_only_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    for name in (f".tmp-tflite_ext-{dead}-abc-m.tflite", f".tmp-tflite_ext-{live}-abc-m.tflite",
                 f".tmp-tflite_ext-{os.getpid()}-abc-m.tflite", ".tmp-abc12345m.tflite"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".tmp-tflite_ext-{dead}-xyz-work").mkdir()
    (tmp_path / f".tmp-tflite_ext-{dead}-xyz-work" / "saved_model.pb").write_bytes(b"x")
    removed = files.remove_stale_temps(tmp_path)
    assert sorted(removed) == [f".tmp-tflite_ext-{dead}-abc-m.tflite",
                               f".tmp-tflite_ext-{dead}-xyz-work"]
    assert sorted(os.listdir(tmp_path)) == sorted([
        f".tmp-tflite_ext-{live}-abc-m.tflite", f".tmp-tflite_ext-{os.getpid()}-abc-m.tflite",
        ".tmp-abc12345m.tflite"])  # a live process's, ours, and another program's naming


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_folder(out) as tmp:
            files.atomic_write(os.path.join(tmp, "report.json"), "half")
            raise RuntimeError("a stage failed")
    assert os.listdir(tmp_path) == ["demo"] and (out / "report.json").read_text() == "old"
    with files.atomic_folder(out) as tmp:
        files.atomic_write(os.path.join(tmp, "report.json"), "new")
        files.atomic_write(os.path.join(tmp, "model.tflite"), b"x")
        assert not (out / "model.tflite").exists()  # nothing visible before the end
    assert os.listdir(tmp_path) == ["demo"]
    assert sorted(os.listdir(out)) == ["model.tflite", "report.json"]
    assert (out / "report.json").read_text() == "new"
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~files._umask())


def test_replaceable_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    (tmp_path / "report.json").write_text("x")
    with pytest.raises(InputError, match=r"holds files this command did not write \(mine.txt\)"):
        files.replaceable_folder(tmp_path, lambda n: n.endswith(".json"))
    assert files.replaceable_folder(tmp_path / "new", lambda n: False) == str(tmp_path / "new")


def test_private_tempdir_holds_tempfile_and_is_removed(tmp_path):
    import tempfile

    with files.private_tempdir(tmp_path) as work:
        assert os.path.dirname(tempfile.mkdtemp()) == work == os.environ["TMPDIR"]
        assert os.path.basename(work).startswith(f".tmp-tflite_ext-{os.getpid()}-")
    assert os.listdir(tmp_path) == [] and tempfile.gettempdir() != work
