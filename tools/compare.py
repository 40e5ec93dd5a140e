"""Peer comparison: tflite_ext against tfmot on one model, one data split, one fine-tune budget.

One invocation trains the float Keras 3 model once, then builds every variant from those same
weights, converts each to .tflite and measures all of them the same way in this process:
accuracy of the .tflite (LiteRT), .tflite and gzip bytes, MACs, and LiteRT median per-sample
latency (1 thread, all variants timed interleaved, round-robin, many rounds).

The tfmot variants run in tools/tfmot_peer.py, a subprocess with `TF_USE_LEGACY_KERAS=1`
(tfmot only works with tf_keras, which must never share a process with Keras 3). It receives
the float weights and the exact data arrays and hands back .tflite files.

Training, measuring and the report tables go through tflite_ext.bench.variants and
tflite_ext.bench.report, as in `tflite-ext demo`.

Example (with the package installed, `pip install -e ".[compare]"`):
    python tools/compare.py --model digits_cnn
    python tools/compare.py --model resnet8 --out build/compare/resnet8
    python tools/compare.py --model digits_cnn --quick     # smoke test, ~1 min
    python tools/compare.py --model resnet8 --recipe auto  # and tflite_ext.compress's own

`--recipe auto` adds `tflite_ext.compress` beside the hand recipes: the same float model, data
and fine-tune budget, its budget the issue's (AUTO_BUDGETS). compare trains one float model
on every training image for all variants, so the search validates on 20% of them, which that
model has seen: its accuracy checks are optimistic here. tools/bench_compress.py keeps them
apart.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

from absl import app, flags

# oneDNN v3.7 (bundled with TF 2.21) corrupts the heap in the weight gradient of a strided 1x1
# Conv2D with fewer than 16 input channels and an odd batch (uxlfoundation/oneDNN#6035): the
# stripped ResNet-8's s2_shortcut has 8, and 1257 training images end each epoch on a batch of
# 9. Off before TensorFlow is imported; the tfmot subprocess inherits it, so both sides train
# the same way. (Training numerics only; .tflite timing is LiteRT.) `strip` warns about it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

from tflite_ext.files import atomic_write, ensure_writable_dir  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfmot_peer.py")
_START = time.perf_counter()

flags.DEFINE_enum("model", "digits_cnn", ["digits_cnn", "resnet8"], "The reference model.")
flags.DEFINE_boolean("quick", False, "A few epochs: a smoke test.")
flags.DEFINE_string("out", None, "Output folder (default build/compare/<model>).")
flags.DEFINE_integer("seed", 0, "Random seed for weights and shuffling.")
flags.DEFINE_boolean("skip_tfmot", False, "Leave out the tfmot peer.")
flags.DEFINE_float("sparsity", None, "tflite_ext structured sparsity (default: per model, "
                   "TX_PRUNING); groups the recipe's group_sparsity names keep their own.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("recipe", "hand", ["hand", "auto"], "auto: also let tflite_ext.compress find "
                  "the recipe for AUTO_BUDGETS, beside the hand recipes.")
FLAGS = flags.FLAGS

# The budget of references.md. "quick" keeps the same shape at a fraction of the cost.
BUDGETS = {
    "full": dict(float_epochs=30, float_lr=1e-3, batch_size=32, prune_epochs=15, prune_lr=5e-4,
                 prune_end_step=400, prune_frequency=100, qat_epochs=5, qat_lr=1e-4,
                 tx_prune_end_step=200, calibration=300, timing_runs=1000, cluster_epochs=10,
                 cluster_lr=1e-4, cluster_update_every=50),
    "quick": dict(float_epochs=15, float_lr=1e-3, batch_size=32, prune_epochs=2, prune_lr=5e-4,
                  prune_end_step=40, prune_frequency=10, qat_epochs=1, qat_lr=1e-4,
                  tx_prune_end_step=20, calibration=100, timing_runs=50, cluster_epochs=1,
                  cluster_lr=1e-4, cluster_update_every=10),
}
TFMOT_SPARSITY = 0.8  # the peer: unstructured magnitude pruning at 80%

# tflite_ext structured pruning per model: the fraction of channels removed from each
# dependency group (or per group, `group_sparsity`), the ranking criterion, kept counts rounded
# to a multiple. The logits layer is never pruned (its outputs are the classes). Recipes were
# chosen on a validation split of the training data (tools/bench_pruning.py --val_fraction,
# tools/bench_prune_qat.py --val_fraction); the test set reports. Same fine-tune budget as
# tfmot (15 epochs, Adam 5e-4), but our sparsity ramp ends at step 200 instead of 400, leaving
# five more epochs to recover (measured on ResNet-8 with its first block removed, validation
# split, seeds 0 and 1: -0.8 and -0.4 point at step 200 against -1.6 and -2.0 at step 400).
# The float model teaches its pruned and QAT copies (distillation, T=4, alpha=0.5); after
# `strip`, BatchNormalization statistics are recalibrated on the training images.
TX_PRUNING = {
    "digits_cnn": dict(sparsity=0.75, importance="l2", round_to=8),
    # ResNet-8: the first residual block goes (its inner group at 1.0: strip removes the
    # block, which leaves the 32x32 stage one conv), the stem keeps its 16 channels, the
    # 16x16 stage keeps 16 of 32 and the 8x8 stage 48 of 64; L2 ranking, multiples of 16.
    # Halving every group instead (stem and block at 8 channels) ran only 2.05x faster on an
    # AMD EPYC, where a 32x32 int8 conv is no cheaper at 4 channels than at 8 (and pruning
    # 60% of every group gave 1.04x on a Xeon with AMX). On validation seeds 0-2 that recipe
    # lost 2, 1 and 2 images of 252, this one 1, -1 and 3 (see README).
    "resnet8": dict(sparsity=0.5, importance="l2", round_to=16,
                    group_sparsity={"s1a_.*": 1.0, "stem_.*": 0.0, "s2.*": 0.5, "s3.*": 0.25}),
}
DISTILL = dict(temperature=4.0, alpha=0.5)
TFMOT_CLUSTERS = 16  # the peer: cluster_weights with 16 clusters on the float model
# tflite_ext weight clustering of the pruned QAT model, then LUT compression for TFLM.
# Digits CNN: the 3x3 convs share 4 values per output channel (2-bit indices; their int8
# weights are per channel anyway, so per-channel centroids cost no extra table bytes), fc1 8
# values per tensor (its int8 weights are per tensor); conv1 (144 weights) and the logits (640)
# stay: a DECODE of theirs costs about what it saves. Linear centroids kept 0.9926 on seed 0
# where k-means++ gave 0.9870 (10 epochs; 8 values per channel: 0.9907, 16,464 bytes).
# ResNet-8: 16 values per output channel on every conv, 16 on the logits, 4-bit LUT.
TX_CLUSTER = {
    "digits_cnn": dict(clusters={"conv[23]": 4, "fc1": 8}, per_channel={"conv.*": True},
                       init="linear", lut=True),
    "resnet8": dict(clusters=16, per_channel={".*_conv|.*_shortcut": True}, init="linear",
                    lut=4),
}


def log(message):
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def load_task(model_name):
    """The reference model builder and its data (references.md)."""
    from tflite_ext import models, tasks

    if model_name == "digits_cnn":
        data = tasks.digits()
        return (lambda: models.digits_cnn(data.input_shape, data.num_classes)), data
    data = tasks.digits(32, 3)
    return (lambda: models.resnet8(data.input_shape, data.num_classes)), data


def layer_weights(model):
    """`{"<layer name>/<i>": array}` for every layer weight: what tools/tfmot_peer.py loads."""
    return {f"{layer.name}/{i}": np.asarray(w.numpy() if hasattr(w, "numpy") else w)
            for layer in model.layers for i, w in enumerate(layer.weights)}


def save_npz(path, arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


# --- The peer subprocess. --------------------------------------------------------------------

def run_tfmot_peer(model_name, out, data, representative, ref_logits, weights, budget, seed):
    """Runs tools/tfmot_peer.py isolated (own interpreter, own env); returns its result dict."""
    spec = {
        "model": model_name, "out": out, "seed": seed, "batch_size": budget["batch_size"],
        "data": os.path.join(out, "peer_data.npz"),
        "weights": os.path.join(out, "float_weights.npz"),
        "result": os.path.join(out, "tfmot_result.json"),
        "variants": [
            dict(name="tfmot_prune80", kind="prune", sparsity=TFMOT_SPARSITY,
                 end_step=budget["prune_end_step"], frequency=budget["prune_frequency"],
                 epochs=budget["prune_epochs"], lr=budget["prune_lr"]),
            dict(name="tfmot_qat", kind="qat", epochs=budget["qat_epochs"], lr=budget["qat_lr"]),
            dict(name="tfmot_cluster16", kind="cluster", clusters=TFMOT_CLUSTERS,
                 epochs=budget["cluster_epochs"], lr=budget["cluster_lr"]),
        ],
    }
    save_npz(spec["weights"], weights)
    save_npz(spec["data"], dict(x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
                                y_test=data.y_test, representative=representative,
                                ref_logits=ref_logits))
    spec_path = os.path.join(out, "peer_spec.json")
    atomic_write(spec_path, json.dumps(spec, indent=2))
    if os.path.exists(spec["result"]):
        os.unlink(spec["result"])  # never report a previous run's files

    # This interpreter, environment and working directory: the peer imports the same
    # tflite_ext (only its stdlib-only `files`), with tf_keras in place of Keras 3.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERAS_", "TF_USE_"))}
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, PEER, "--spec", spec_path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def relay():
        for line in proc.stdout:
            lines.append(line)
            text = line.rstrip()
            # Relay the peer's own progress lines, not TF/absl chatter ("W1201 14:44:55.06
            # ...]", "INFO:tensorflow:..." from Python, "I0000 00:00:..." from C++).
            if text and not re.match(r"[IWEF]\d{4} |(INFO|WARNING):|  ", text):
                log(f"[tfmot] {text}")

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    code = proc.wait()
    thread.join()
    atomic_write(os.path.join(out, "tfmot_peer.log"), "".join(lines))
    if code != 0 or not os.path.exists(spec["result"]):
        tail = "".join(lines[-15:])
        raise RuntimeError(f"tools/tfmot_peer.py failed (exit {code}); see "
                           f"{out}/tfmot_peer.log. Last lines:\n{tail}")
    with open(spec["result"]) as f:
        return json.load(f)


# --- tflite_ext variants (each returns a Keras 3 model ready for conversion). ---------------

def fit(model, data, epochs, lr, budget, label, callbacks=(), teacher=None):
    """`variants.fit` with this comparison's batch size, distillation and progress log."""
    from tflite_ext.bench import variants

    return variants.fit(model, data, epochs=epochs, learning_rate=lr,
                        batch_size=budget["batch_size"], teacher=teacher, callbacks=callbacks,
                        label=label, log=log, **DISTILL)


def tx_structured_prune(float_model, data, budget, model_name):
    """tflite_ext structured pruning with tfmot's schedule and fine-tune budget, then strip."""
    from tflite_ext import pruning

    config = TX_PRUNING[model_name]
    schedule = pruning.PolynomialDecay(initial_sparsity=0.0, final_sparsity=config["sparsity"],
                                       begin_step=0, end_step=budget["tx_prune_end_step"],
                                       frequency=budget["prune_frequency"])
    pruned = pruning.prune(float_model, schedule, layers=lambda layer: layer.name != "logits",
                           importance=config["importance"], round_to=config["round_to"],
                           group_sparsity=config.get("group_sparsity"))
    fit(pruned, data, budget["prune_epochs"], budget["prune_lr"], budget, "tx_prune",
        callbacks=[pruning.PruningCallback()], teacher=float_model)
    small = pruning.strip(pruned)
    pruning.recalibrate_batch_norm(small, data.x_train, budget["batch_size"])
    return small


def tx_qat(model, teacher, data, budget, label="tx_qat"):
    """tflite_ext quantization-aware training with tfmot's QAT budget."""
    from tflite_ext import quantization

    qat = quantization.quantize_model(model)
    return fit(qat, data, budget["qat_epochs"], budget["qat_lr"], budget, label,
               teacher=teacher)


def tx_cluster(stripped, teacher, data, budget, model_name):
    """QAT + weight clustering of the pruned model in one fit, then `strip_clustering` and
    int8 with a LUT copy proven bit-identical in TFLM on every test image."""
    from tflite_ext import clustering, convert, quantization

    config = dict(TX_CLUSTER[model_name])
    lut = config.pop("lut")
    clustered = clustering.cluster(quantization.quantize_model(stripped), **config)
    fit(clustered, data, budget["cluster_epochs"], budget["cluster_lr"], budget, "tx_cluster",
        callbacks=[clustering.ClusteringCallback(budget["cluster_update_every"])],
        teacher=teacher)
    final = clustering.strip_clustering(clustered)
    return final, convert.to_tflite(final, lut=lut, lut_data=data.x_test)


# `--recipe auto`: the budgets. Digits CNN: flash <= the float model / 80 on TFLM
# (micro), within 0.5 point; ResNet-8: latency <= 0.4x the unpruned int8 model on this host
# (LiteRT XNNPACK, 1 thread), within 1 point.
AUTO_BUDGETS = {"digits_cnn": dict(target="micro", float_bytes_over=80, max_drop=0.5),
                "resnet8": dict(target="host", latency_fraction=0.4, max_drop=1.0)}
AUTO_LABEL = "tflite_ext compress (auto) → int8"
AUTO_LUT_LABEL = "tflite_ext compress (auto) → int8 LUT (TFLM)"


def tx_auto(float_model, data, files, budget, model_name, out):
    """`tflite_ext.compress` on this model for AUTO_BUDGETS, with the hand recipes' fine-tune
    budget; its search validates on 20% of the training images. Raises BudgetError."""
    from tflite_ext import compress, tasks

    config = AUTO_BUDGETS[model_name]
    target = compress.get_target(config["target"])
    if "float_bytes_over" in config:
        limit = compress.Budget(flash_bytes=len(files["float32"]) // config["float_bytes_over"])
    else:
        base = target.measure({"ptq": files["PTQ int8"]})["ptq"]["latency_us"]
        limit = compress.Budget(latency_us=config["latency_fraction"] * base)
    split = tasks.validation_split(data, 0.2, FLAGS.seed)
    log(f"compress (auto): {limit} on {target.name}")
    return compress(float_model, (split.x_train, split.y_train), (split.x_test, split.y_test),
                    limit, target=target, max_accuracy_drop=config["max_drop"],
                    epochs=budget["prune_epochs"], learning_rate=budget["prune_lr"],
                    out_dir=os.path.join(out, "compress"), log=log)


def tflm_accuracy(flatbuffer, x, y):
    """Top-1 accuracy of a .tflite run by TFLite Micro (LiteRT cannot run TFLM_DECODE)."""
    from tflite_ext.bench import micro

    return micro.evaluate(flatbuffer, x, y)["accuracy"]


# --- Report. -------------------------------------------------------------------------------

COLUMNS = [("variant", "variant"), ("accuracy", "test acc", "{:.4f}"),
           ("bytes", ".tflite bytes", "{:,}"), ("gzip_bytes", "gzip bytes", "{:,}"),
           ("macs", "MACs", "{:,}"), ("median_us", "median µs", "{:.1f}"),
           ("bytes_vs_ptq", "bytes ÷ PTQ", "{:.2f}×"), ("macs_vs_ptq", "MACs ÷ PTQ", "{:.2f}×"),
           ("speedup_vs_ptq", "speed-up vs PTQ", "{:.2f}×")]
TARGET_COLUMNS = [("target", "target"), ("measured", "measured"),
                  ("passed", "met", lambda passed: "yes" if passed else "NO")]


def check_targets(model_name, rows):
    """The issue targets, measured on this run's figures: [(target, measured, passed)]."""
    by = {r["variant"]: r for r in rows}
    flt, ptq = by.get("float32"), by.get("PTQ int8")
    tfmot = by.get("tfmot prune 80% + strip → int8")
    checks = []

    def add(text, measured, ok):
        checks.append({"target": text, "measured": measured, "passed": bool(ok)})

    prune = by.get("tflite_ext structured prune + strip → int8")
    if prune and model_name == "digits_cnn" and tfmot:
        add("tflite_ext pruned int8 bytes ≤ 1/10 of tfmot 80% int8 bytes",
            f"{prune['bytes']:,} vs {tfmot['bytes']:,} ({tfmot['bytes'] / prune['bytes']:.1f}× "
            f"smaller)", prune["bytes"] * 10 <= tfmot["bytes"])
        add("tflite_ext pruned accuracy ≥ float − 0.5 point",
            f"{prune['accuracy']:.4f} vs {flt['accuracy']:.4f}",
            prune["accuracy"] >= flt["accuracy"] - 0.005)
    if prune and model_name == "resnet8":
        add("≥ 3× fewer MACs than unpruned int8", f"{ptq['macs'] / prune['macs']:.2f}×",
            prune["macs"] * 3 <= ptq["macs"])
        add("≥ 2× lower LiteRT latency than unpruned int8",
            f"{ptq['median_us'] / prune['median_us']:.2f}×",
            prune["median_us"] * 2 <= ptq["median_us"])
        add("accuracy ≥ unpruned int8 − 1 point",
            f"{prune['accuracy']:.4f} vs {ptq['accuracy']:.4f}",
            prune["accuracy"] >= ptq["accuracy"] - 0.01)
    lut = by.get(LUT_LABEL)
    pqat = by.get("tflite_ext prune → strip → QAT → int8")
    if lut and pqat and model_name == "digits_cnn":
        add("pruned + QAT + clustered + LUT flash ≤ 60% of pruned + QAT int8",
            f"{lut['bytes']:,} vs {pqat['bytes']:,} ({lut['bytes'] / pqat['bytes']:.1%})",
            lut["bytes"] <= 0.6 * pqat["bytes"])
        add("pruned + QAT + clustered + LUT accuracy ≥ float − 0.5 point (this seed)",
            f"{lut['accuracy']:.4f} vs {flt['accuracy']:.4f}",
            lut["accuracy"] >= flt["accuracy"] - 0.005)
        add("float → final ≥ 70× smaller", f"{flt['bytes'] / lut['bytes']:.1f}×",
            flt["bytes"] >= 70 * lut["bytes"])
    if lut:
        add("TFLM outputs of the LUT file identical to the uncompressed int8 on every test "
            "image", f"{lut['identical_samples']} of {lut['test_samples']}",
            lut["identical_samples"] == lut["test_samples"])
    if lut and prune and model_name == "resnet8":
        add("4-bit LUT on the pruned model: accuracy ≥ pruned int8 − 1 point",
            f"{lut['accuracy']:.4f} vs {prune['accuracy']:.4f}",
            lut["accuracy"] >= prune["accuracy"] - 0.01)
    auto = by.get(AUTO_LUT_LABEL) or by.get(AUTO_LABEL)
    if auto and model_name == "digits_cnn":
        add("compress (auto): flash ≤ float / 80", f"{auto['bytes']:,} vs "
            f"{flt['bytes'] // 80:,} ({flt['bytes'] / auto['bytes']:.1f}× smaller)",
            auto["bytes"] <= flt["bytes"] // 80)
        add("compress (auto): accuracy ≥ float − 0.5 point",
            f"{auto['accuracy']:.4f} vs {flt['accuracy']:.4f}",
            auto["accuracy"] >= flt["accuracy"] - 0.005)
    if auto and model_name == "resnet8":
        add("compress (auto): LiteRT latency ≤ 0.4× unpruned int8",
            f"{auto['median_us'] / ptq['median_us']:.2f}×",
            auto["median_us"] <= 0.4 * ptq["median_us"])
        add("compress (auto): accuracy ≥ unpruned int8 − 1 point",
            f"{auto['accuracy']:.4f} vs {ptq['accuracy']:.4f}",
            auto["accuracy"] >= ptq["accuracy"] - 0.01)
        if prune:
            add("compress (auto): as fast as the hand recipe, or more accurate",
                f"{auto['median_us']:.1f} vs {prune['median_us']:.1f} µs, "
                f"{auto['accuracy']:.4f} vs {prune['accuracy']:.4f}",
                auto["median_us"] <= prune["median_us"]
                or auto["accuracy"] > prune["accuracy"])
    for name in ("tflite_ext QAT → int8", "tflite_ext prune → strip → QAT → int8"):
        qat = by.get(name)
        if not qat or model_name != "digits_cnn":
            continue
        add(f"{name}: accuracy ≥ PTQ int8", f"{qat['accuracy']:.4f} vs {ptq['accuracy']:.4f}",
            qat["accuracy"] >= ptq["accuracy"])
        add(f"{name}: accuracy ≥ float − 0.3 point",
            f"{qat['accuracy']:.4f} vs {flt['accuracy']:.4f}",
            qat["accuracy"] >= flt["accuracy"] - 0.003)
        if qat.get("keras_agreement") is not None:
            add(f"{name}: .tflite top-1 agrees with Keras QAT model on ≥ 99.5%",
                f"{qat['keras_agreement']:.4f}", qat["keras_agreement"] >= 0.995)
        if "prune" in name and tfmot:
            add(f"{name}: bytes ≤ 1/10 of tfmot 80% int8 bytes",
                f"{qat['bytes']:,} vs {tfmot['bytes']:,}", qat["bytes"] * 10 <= tfmot["bytes"])
    return checks


def render_markdown(result):
    from tflite_ext.bench.report import markdown_table

    lines = [f"# Peer comparison: {result['model']}{' (quick)' if result['quick'] else ''}", "",
             f"Data: {result['data']}. Budget: {json.dumps(result['budget'])}.",
             (f"LiteRT, 1 thread, median of {result['timing']['samples_per_variant']} "
              f"single invokes per variant, all variants interleaved, on "
              f"{result['environment']['cpu']}."), "",
             markdown_table(result["rows"], COLUMNS)]
    if result["targets"]:
        lines += ["## Targets", "", markdown_table(result["targets"], TARGET_COLUMNS)]
    lines += [(f"tflite_ext recipe: {json.dumps(result['tx_pruning'])}, taught by the float "
               f"model ({json.dumps(result['distill'])})."), ""]
    if result["skipped"]:
        lines += ["Not run: " + "; ".join(result["skipped"]), ""]
    return "\n".join(lines)


# --- The run. ------------------------------------------------------------------------------

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    out = os.path.abspath(FLAGS.out or os.path.join("build", "compare", FLAGS.model))
    ensure_writable_dir(out)
    budget = dict(BUDGETS["quick" if FLAGS.quick else "full"])
    if FLAGS.sparsity is not None:
        TX_PRUNING[FLAGS.model] = dict(TX_PRUNING[FLAGS.model], sparsity=FLAGS.sparsity)

    import keras

    from tflite_ext import convert
    from tflite_ext.bench import report, variants

    keras.utils.set_random_seed(FLAGS.seed)
    build, data = load_task(FLAGS.model)
    representative = data.x_train[:budget["calibration"]]
    log(f"{FLAGS.model}: {len(data.x_train)} train / {len(data.x_test)} test samples, "
        f"input {data.input_shape}; budget {'quick' if FLAGS.quick else 'full'}")

    # 1. The float model, trained once; every variant starts from these weights.
    float_model = fit(build(), data, budget["float_epochs"], budget["float_lr"], budget,
                      "float")
    float_model.save(os.path.join(out, "float.keras"))
    ref_logits = float_model.predict(data.x_test, verbose=0)
    keras_models = {"float32": float_model, "PTQ int8": float_model}

    def to_int8(model):
        return convert.to_tflite(model, representative, mode="int8",
                                 num_calibration_samples=len(representative)).flatbuffer

    files = {"float32": convert.to_tflite(float_model, mode="float32").flatbuffer,
             "PTQ int8": to_int8(float_model)}
    log("float32 and PTQ int8 converted")
    skipped, peer = [], None

    # 3-4. tfmot, isolated in its own process with tf_keras.
    if FLAGS.skip_tfmot:
        skipped.append("tfmot variants (--skip_tfmot)")
    else:
        log("tfmot peer: starting subprocess (TF_USE_LEGACY_KERAS=1)")
        peer = run_tfmot_peer(FLAGS.model, out, data, representative, ref_logits,
                              layer_weights(float_model), budget, FLAGS.seed)
        for key, label in (("tfmot_prune80", "tfmot prune 80% + strip → int8"),
                           ("tfmot_qat", "tfmot QAT → int8"),
                           ("tfmot_cluster16", "tfmot cluster 16 → strip → int8")):
            with open(peer["variants"][key]["tflite"], "rb") as f:
                files[label] = f.read()

    # 5-7. tflite_ext. QAT models convert without calibration data: their ranges are trained.
    keras.utils.set_random_seed(FLAGS.seed)
    stripped = tx_structured_prune(float_model, data, budget, FLAGS.model)
    stripped.save(os.path.join(out, "tx_pruned.keras"))
    label = "tflite_ext structured prune + strip → int8"
    files[label], keras_models[label] = to_int8(stripped), stripped
    for label, start in (("tflite_ext QAT → int8", float_model),
                         ("tflite_ext prune → strip → QAT → int8", stripped)):
        keras.utils.set_random_seed(FLAGS.seed)
        qat = tx_qat(start, float_model, data, budget, label=label)
        files[label], keras_models[label] = convert.to_tflite(qat).flatbuffer, qat
    keras.utils.set_random_seed(FLAGS.seed)
    clustered, lut_result = tx_cluster(stripped, float_model, data, budget, FLAGS.model)
    files[CLUSTER_LABEL], keras_models[CLUSTER_LABEL] = lut_result.flatbuffer, clustered

    auto = None
    if FLAGS.recipe == "auto":
        from tflite_ext.compress import BudgetError

        keras.utils.set_random_seed(FLAGS.seed)
        try:
            auto = tx_auto(float_model, data, files, budget, FLAGS.model, out)
        except BudgetError as e:
            skipped.append(f"compress (auto): {e}")
        else:
            files[AUTO_LABEL], keras_models[AUTO_LABEL] = auto.flatbuffer, auto.model

    # Measure every .tflite the same way, here.
    measured = variants.measure(files, data.x_test, data.y_test, keras_models=keras_models,
                                runs=budget["timing_runs"], warmup=20, log=log)
    rows = []
    for name, metrics in measured.items():
        file = f"{_file_name(name)}.tflite"
        atomic_write(os.path.join(out, file), files[name])
        rows.append({"variant": name, "accuracy": metrics.pop("tflite_accuracy"), **metrics,
                     "file": file})
    rows.append(lut_row(lut_result, data, out))
    if peer is not None:  # tfmot's clustered int8 weights are few-valued too: our LUT stage
        rows.append(tfmot_lut_row(files["tfmot cluster 16 → strip → int8"], data, out))
    if auto is not None and auto.deployed is not auto.flatbuffer:  # clustered: the TFLM file
        from tflite_ext import lut

        proof = lut.verify(auto.flatbuffer, auto.deployed, data.x_test)
        rows.append(lut_row(convert_result(auto.flatbuffer, auto.deployed,
                                           auto.conversion.lut.report["tensors"], proof),
                            data, out, AUTO_LUT_LABEL))
    ptq = next(r for r in rows if r["variant"] == "PTQ int8")
    for row in rows:
        row["bytes_vs_ptq"] = ptq["bytes"] / row["bytes"]
        row["macs_vs_ptq"] = ptq["macs"] / row["macs"] if row["macs"] else None
        row["speedup_vs_ptq"] = (ptq["median_us"] / row["median_us"] if row.get("median_us")
                                 else None)

    result = {
        "model": FLAGS.model, "quick": FLAGS.quick, "seed": FLAGS.seed, "budget": budget,
        "data": (f"sklearn digits {data.input_shape}, {len(data.x_train)} train / "
                 f"{len(data.x_test)} test (70/30 stratified, random_state=0)"),
        "tx_pruning": TX_PRUNING[FLAGS.model], "tfmot_sparsity": TFMOT_SPARSITY,
        "tx_cluster": TX_CLUSTER[FLAGS.model], "tfmot_clusters": TFMOT_CLUSTERS,
        "timing": {"threads": 1, "rounds": budget["timing_runs"],
                   "samples_per_variant": budget["timing_runs"]},
        "rows": rows, "tfmot": peer, "skipped": skipped, "distill": DISTILL,
        "auto": None if auto is None else {"plan": auto.plan, "measured": auto.measured,
                                           "seconds": auto.report["seconds"]},
        "targets": check_targets(FLAGS.model, rows), "environment": variants.environment(),
    }
    markdown = render_markdown(result)
    report.write_report(out, "compare", result, markdown)
    print("\n" + markdown)
    log(f"wrote {out}/compare.json and compare.md")
    return 0


CLUSTER_LABEL = "tflite_ext prune → strip → QAT + cluster → int8"
LUT_LABEL = "tflite_ext prune → strip → QAT + cluster → int8 LUT (TFLM)"


def lut_row(lut_result, data, out, label=None):
    """The LUT file's row: bytes, gzip, MACs, its accuracy in TFLM (LiteRT cannot run it, so
    no LiteRT latency), and the bit-identity proof made on the test images."""
    import gzip

    from tflite_ext import inspect

    small, label = lut_result.lut.flatbuffer, label or LUT_LABEL
    file = f"{_file_name(label)}.tflite"
    atomic_write(os.path.join(out, file), small)
    info = inspect.summary(small)
    return {"variant": label, "accuracy": tflm_accuracy(small, data.x_test, data.y_test),
            "bytes": len(small), "gzip_bytes": len(gzip.compress(small, 9)),
            "macs": info["macs"], "median_us": None, "runtime": "TFLM",
            "full_integer": info["full_integer"],
            "file": file, "test_samples": len(data.x_test),
            "identical_samples": lut_result.lut.report["verified"]["samples"],
            "lut_tensors": lut_result.lut.report["tensors"],
            "bits_per_weight": [round(t["bits_per_weight"], 2) for t in info["compressed"]],
            "huffman_estimate_bytes": sum(t["huffman_estimate_bytes"]
                                          for t in info["compressed"])}


TFMOT_LUT_LABEL = "tfmot cluster 16 → int8 → tflite_ext LUT (TFLM)"


def tfmot_lut_row(flatbuffer, data, out):
    """tfmot's clustered int8 file through `tflite_ext.lut` (4-bit), proven on the test set."""
    from tflite_ext import lut

    small, plan = lut.compress(flatbuffer, 4)
    proof = lut.verify(flatbuffer, small, data.x_test)
    row = lut_row(convert_result(flatbuffer, small, plan, proof), data, out, TFMOT_LUT_LABEL)
    return row


def convert_result(flatbuffer, small, plan, proof):
    """A `ConversionResult` holding an already compressed pair (for `lut_row`)."""
    from tflite_ext import convert

    report = {"tensors": plan, "bytes_before": len(flatbuffer), "bytes": len(small),
              "verified": proof}
    return convert.ConversionResult(flatbuffer, {}, convert.LutResult(small, report))


def _file_name(variant):
    """A file-system-safe name for a variant label."""
    keep = "".join(c if c.isalnum() else "_" for c in variant.lower())
    return "_".join(p for p in keep.split("_") if p)


if __name__ == "__main__":
    app.run(main)
