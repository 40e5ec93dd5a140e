r"""A large input through the whole flow: Keras MobileNetV2 (`weights=None`, 150+ layers)
prune -> strip -> QAT -> convert -> inspect -> micro, each stage timed.

Stages (random data: the point is that every stage handles a published architecture of this
size, and how long each takes, not accuracy):

1. build: `keras.applications.MobileNetV2(weights=None, input_shape=(S, S, 3), classes=10)`
   (softmax head, as Keras ships it), compiled with Adam and sparse categorical
   cross-entropy on probabilities;
2. prune: `pruning.prune` (channel pruning, L2, --sparsity per group, --round_to) and one
   epoch on --samples random images with `PruningCallback` (the schedule prunes at step 0);
3. strip: the physically smaller model;
4. qat: `quantize_model` and one epoch with `FreezeQuantization` after half of the steps;
5. convert: `convert.to_tflite` full int8 (QAT ranges, no representative data);
6. inspect: `inspect.summary` (ops, MACs, full-integer check);
7. micro: `bench.micro.analyze` (exact TFLM arena, host latency over --micro_runs runs,
   TFLM vs LiteRT agreement on --agreement_samples samples).

A stage that breaks stops the run with its name and the error (exit status 1).

Usage:
    python tools/bench_large_model.py                    # 96x96, alpha 1.0
    python tools/bench_large_model.py --size 128 --alpha 0.35 --json
"""
import os
import sys
import time
import traceback

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN training crashes on some CPUs

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import convert, inspect, pruning  # noqa: E402
from tflite_ext.bench import micro, report, variants  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, quantize_model  # noqa: E402

flags.DEFINE_integer("size", 96, "Input height and width.", lower_bound=32)
flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("samples", 64, "Random training images per fit.", lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Batch size of both fits.", lower_bound=1)
flags.DEFINE_float("sparsity", 0.5, "Channels pruned per group.", lower_bound=0.0,
                   upper_bound=0.95)
flags.DEFINE_integer("round_to", 8, "Kept channels rounded to a multiple of this.",
                     lower_bound=1)
flags.DEFINE_integer("micro_runs", 3, "TFLM invocations timed.", lower_bound=1)
flags.DEFINE_integer("agreement_samples", 10, "Samples TFLM and LiteRT are compared on.",
                     lower_bound=1)
flags.DEFINE_boolean("json", False, "Print the rows as JSON instead of a Markdown table.")
FLAGS = flags.FLAGS

COLUMNS = [("stage", "stage"), ("seconds", "seconds", "{:.1f}"), ("layers", "layers"),
           ("params", "parameters", "{:,}"), ("bytes", ".tflite bytes", "{:,}"),
           ("notes", "after the stage")]


class StageFailed(Exception):
    """A stage raised: the run stops with the stage's name."""


def _compiled(model, learning_rate):
    model.compile(keras.optimizers.Adam(learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    return model


def _fit(model, data, callbacks=()):
    x, y = data
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, callbacks=list(callbacks))
    return model


def _model_row(model):
    return {"layers": len(model.layers), "params": model.count_params()}


def build(state):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(FLAGS.size,) * 2 + (3,),
                                           alpha=FLAGS.alpha, classes=10)
    state["float"] = _compiled(model, 1e-3)
    return {**_model_row(model), "notes": f"{FLAGS.size}x{FLAGS.size}x3, alpha {FLAGS.alpha:g}"}


def prune(state):
    start = time.perf_counter()
    pruned = pruning.prune(state["float"], FLAGS.sparsity, round_to=FLAGS.round_to)
    wrapped = time.perf_counter() - start
    callback = pruning.PruningCallback()
    _fit(_compiled(pruned, 1e-4), state["data"], [callback])
    state["pruned"] = pruned
    wrappers = len(pruning.pruning_wrappers(pruned))
    steps = ", ".join(f"step {s}: {v:.2f}" for s, v in callback.history)
    return {**_model_row(pruned), "notes": f"{wrappers} layers wrapped in {wrapped:.1f} s, "
                                           f"then the fit; sparsity at {steps}"}


def strip(state):
    small = pruning.strip(state["pruned"])
    state["stripped"] = small
    ratio = small.count_params() / state["float"].count_params()
    return {**_model_row(small), "notes": f"{ratio:.1%} of the float parameters"}


def qat(state):
    start = time.perf_counter()
    model = quantize_model(state["stripped"])
    wrapped = time.perf_counter() - start
    steps = -(-FLAGS.samples // FLAGS.batch_size)
    _fit(_compiled(model, 1e-5), state["data"], [FreezeQuantization(steps // 2)])
    state["qat"] = model
    return {**_model_row(model), "notes": f"quantize_model {wrapped:.1f} s, then {steps} "
                                          f"steps, ranges frozen after {steps // 2}"}


def convert_stage(state):
    result = convert.to_tflite(state["qat"])
    state["flatbuffer"] = result.flatbuffer
    return {"bytes": len(result.flatbuffer), "notes": "full int8, int8 I/O"}


def inspect_stage(state):
    info = inspect.summary(state["flatbuffer"])
    if not info["full_integer"]:
        raise StageFailed(f"the .tflite is not full integer: {info['float_ops']}")
    ops = sum(info["op_counts"].values())
    return {"bytes": info["size_bytes"],
            "notes": f"{ops} ops ({len(info['op_counts'])} kinds), {info['macs']:,} MACs, "
                     f"full integer"}


def micro_stage(state):
    x = state["data"][0][:FLAGS.agreement_samples]
    result = micro.analyze(state["flatbuffer"], x, runs=FLAGS.micro_runs)
    agree = result["agreement"]
    return {"bytes": result["size_bytes"],
            "notes": f"arena {result['arena_bytes']:,} B, TFLM host median "
                     f"{result['latency']['median_us'] / 1e3:,.0f} ms, top-1 = LiteRT on "
                     f"{agree['top1_agreement']:.0%} of {len(x)}"}


STAGES = [("build", build), ("prune", prune), ("strip", strip), ("qat", qat),
          ("convert", convert_stage), ("inspect", inspect_stage), ("micro", micro_stage)]


def run():
    """The table rows, one per stage; raises StageFailed naming the stage that broke."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    shape = (FLAGS.samples, FLAGS.size, FLAGS.size, 3)
    state = {"data": (rng.random(shape, dtype=np.float32),
                      rng.integers(0, 10, FLAGS.samples))}
    rows = []
    for name, stage in STAGES:
        start = time.perf_counter()
        try:
            row = stage(state)
        except Exception as e:
            traceback.print_exc()
            raise StageFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from None
        rows.append({"stage": name, "seconds": time.perf_counter() - start, **row})
        print(f"{name}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    try:
        rows = run()
    except StageFailed as e:
        sys.exit(f"bench_large_model: {e}")
    env = variants.environment()
    total = sum(r["seconds"] for r in rows)
    if FLAGS.json:
        print(report.to_json({"environment": env, "stages": rows, "total_seconds": total}),
              end="")
        return
    print(f"MobileNetV2 (weights=None) {FLAGS.size}x{FLAGS.size}, alpha {FLAGS.alpha:g}, "
          f"{FLAGS.samples} random images, batch {FLAGS.batch_size}; CPU: {env['cpu']} "
          f"({env['cpus']} cores), TensorFlow {env['tensorflow']}\n")
    print(report.markdown_table(rows, COLUMNS), end="")
    print(f"\ntotal {total:.1f} s")


if __name__ == "__main__":
    app.run(main)
