"""Pruning, QAT, clustering and distillation under `tf.distribute` (issue 16, item 2).

MirroredStrategy needs the host CPU split into two logical devices before TensorFlow starts,
and MultiWorkerMirroredStrategy needs its own processes, so both run
`tools/distributed_worker.py` in fresh subprocesses (started together, once per module):

- one process trains each case (a pruned QAT model whose channels are ranked by mean
  activation, with FreezeQuantization; a pruned student taught by its float model; a
  clustered model, per-channel k-means++ centroids, assignments refreshed every 3 steps)
  on one device and on two replicas (same initial weights, same data in the same order,
  same global batch of 32, SGD, oneDNN off);
- two worker processes form a MultiWorkerMirroredStrategy cluster on loopback ports, train
  the pruned QAT and the clustered cases, are interrupted after 2 of 3 epochs, and resume
  from `keras.callbacks.BackupAndRestore`.

Bounds (measured on the 2-core test machine: masks, steps, observer flags and cluster
assignments identical; weights, centroids, BN statistics and ranges within 3e-8; summed
activations within 2e-7 relative): masks, steps, observer flags and cluster assignments
exactly equal; weights, centroids, BN statistics and quantization ranges within 1e-6;
activation sums within 1e-5 relative.

A new case is one `Case` in the worker's `CASES`, its name in the worker's
`MIRRORED_CASES` (`MULTIWORKER_CASES`) and in `MIRRORED_CASES` (`RESUMED_CASES`) below;
`BOUNDS` says how its variables compare.
"""
import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import tiny_cnn
from tflite_ext import pruning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tools", "distributed_worker.py")
MIRRORED_CASES = ("prune_qat", "distill_prune", "cluster")
RESUMED_CASES = ("prune_qat", "cluster")

EXACT = ("in_mask", "out_mask", "weight_mask", "pruning_step", "observed", "observing",
         "bn_observing", "act_count", "act_zero_sum", "kernel_pinned", "kernel_assignments")
# variable name -> (absolute bound, relative bound); names not listed: EXACT or DEFAULT.
BOUNDS = {"act_abs_sum": (0.0, 1e-5)}
DEFAULT = (1e-6, 0.0)  # weights, BN statistics, ranges
TIMEOUT = 600


def _env():
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                          if p))
    env.pop("TF_CONFIG", None)
    return env


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(args, env, log):
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _finish(process, log):
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout"
    if code != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-30:])
        pytest.fail(f"{os.path.basename(log)} exited with {code}:\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distribute")
    env = _env()
    jobs = [(_start(["--mode", "mirrored", "--devices", "2", "--out",
                     str(folder / "mirrored.npz")], env, folder / "mirrored.log"),
             folder / "mirrored.log")]
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    for index in range(2):
        worker_env = dict(env, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = folder / f"worker{index}.log"
        jobs.append((_start(["--mode", "multiworker", "--out",
                             str(folder / f"worker{index}.npz")], worker_env, log), log))
    for process, log in jobs:
        _finish(process, log)
    return {"mirrored": dict(np.load(folder / "mirrored.npz")),
            "workers": [dict(np.load(folder / f"worker{i}.npz")) for i in range(2)]}


def _variables(results, prefix):
    """{INDEX/NAME: value} of one run."""
    return {k[len(prefix) + 1:]: v for k, v in results.items()
            if k.startswith(prefix + "/") and not k.rsplit("/", 1)[-1].startswith("_")}


def _assert_same(expected, actual):
    """Every variable within its bound; returns {name: largest absolute difference}."""
    assert sorted(expected) == sorted(actual)
    largest = {}
    for key, want in expected.items():
        got, name = actual[key], key.rsplit("/", 1)[-1]
        assert got.shape == want.shape, key
        diff = np.abs(got.astype(np.float64) - want)
        if name in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            atol, rtol = BOUNDS.get(name, DEFAULT)
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=key)
        largest[name] = max(largest.get(name, 0.0), float(diff.max()) if diff.size else 0.0)
    return largest


def test_mirrored_runs_every_case(runs):
    cases = {k.split("/", 1)[0] for k in runs["mirrored"]}
    assert cases == set(MIRRORED_CASES)


@pytest.mark.parametrize("case", MIRRORED_CASES)
def test_two_replicas_equal_one_device(runs, case):
    results = runs["mirrored"]
    one = _variables(results, f"{case}/one")
    # Every replica's copy of every variable is the same (range, BN statistics and
    # activation-sum updates are computed from the global batch on each replica).
    assert results[f"{case}/mirrored/_spread"] == 0.0
    largest = _assert_same(one, _variables(results, f"{case}/mirrored"))
    print(case, {k: f"{v:.1e}" for k, v in largest.items()})
    # Not vacuous: the schedule reached 50%: half of c1's 8 and c2's 16 channels are masked
    # (the logits, a model output, keep theirs); QAT ranges moved.
    if "prune" in case:
        pruned = sorted(int(np.sum(v == 0)) for k, v in one.items() if k.endswith("/out_mask"))
        assert pruned == [0, 4, 8]
        steps = [int(v) for k, v in one.items() if k.endswith("/pruning_step")]
        assert set(steps) == {12}  # 3 epochs of 4 batches
    if "qat" in case:
        highs = [float(v) for k, v in one.items() if k.endswith("/range_max")]
        assert highs and all(0.0 < h < 6.0 for h in highs)
    if case == "cluster":
        # The refreshes moved weights between clusters, the same ones on both runs.
        assert int(results["cluster/one/_moved"]) > 0
        assert results["cluster/mirrored/_moved"] == results["cluster/one/_moved"]
        assignments = [v for k, v in one.items() if k.endswith("/kernel_assignments")]
        assert len(assignments) == 3                      # c1, c2 and the logits


def test_multi_worker_same_state_on_both_workers(runs):
    first, second = runs["workers"]
    assert int(first["_replicas"]) == int(second["_replicas"]) == 2
    assert sorted(first) == sorted(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for case in RESUMED_CASES:
        assert first[f"{case}/resumed/_spread"] == 0.0


@pytest.mark.parametrize("case", RESUMED_CASES)
def test_multi_worker_resumes_to_the_one_device_result(runs, case):
    worker = runs["workers"][0]
    # Interrupted after epoch 2 of 3, the fresh model restarted at epoch index 2 ...
    assert int(worker[f"{case}/resumed/_initial_epoch"]) == 2
    # ... and ended where one device without interruption ends (the clustering refreshes
    # at steps 9 and 12 counted from the restored optimizer, not from the resumed fit).
    largest = _assert_same(_variables(runs["mirrored"], f"{case}/one"),
                           _variables(worker, f"{case}/resumed"))
    print("resumed", case, {k: f"{v:.1e}" for k, v in largest.items()})


class _Interrupted(Exception):
    pass


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise _Interrupted()


def _pruned_tiny(weights):
    model = tiny_cnn(8)
    model.set_weights(weights)
    pruned = pruning.prune(model, pruning.PolynomialDecay(0.0, 0.5, 0, 8, power=1,
                                                          frequency=2))
    pruned.compile(keras.optimizers.SGD(0.05),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned(keras.ops.zeros((1, 8, 8, 1)))
    return pruned


def test_pruning_callback_resumes_when_listed_before_backup_and_restore(digits, tmp_path):
    """BackupAndRestore restores the step and masks in its on_train_begin, which runs after
    PruningCallback's when listed after it: the callback must read them at the first batch
    (it read them in on_train_begin, and a resumed fit restarted its schedule at step 0)."""
    keras.utils.set_random_seed(0)
    weights = tiny_cnn(8).get_weights()
    x, y = digits.x_train[:128], digits.y_train[:128]
    fit = dict(batch_size=32, epochs=3, shuffle=False, verbose=0)
    straight = _pruned_tiny(weights)
    callback = pruning.PruningCallback()
    straight.fit(x, y, callbacks=[callback], **fit)
    backup = str(tmp_path / "backup")
    with pytest.raises(_Interrupted):
        _pruned_tiny(weights).fit(x, y, callbacks=[
            pruning.PruningCallback(), keras.callbacks.BackupAndRestore(backup),
            _StopAfter(1)], **fit)
    resumed = _pruned_tiny(weights)
    resumed_callback = pruning.PruningCallback()
    resumed.fit(x, y, callbacks=[resumed_callback, keras.callbacks.BackupAndRestore(backup)],
                **fit)
    # The resumed callback pruned at steps 4, 6 and 8 only, as the straight one did there.
    assert resumed_callback.history == [h for h in callback.history if h[0] > 4]
    assert [h[0] for h in callback.history] == [0, 2, 4, 6, 8]
    for a, b in zip(straight.variables, resumed.variables):
        if a.name in ("in_mask", "out_mask", "pruning_step"):
            np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
        else:
            np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-6, err_msg=a.path)
