r"""Pruning + QAT on the digits CNN of references.md: per-seed bytes, int8 accuracy, issue 4's
targets.

Float: Adam 1e-3, 30 epochs, batch 32. PTQ: full int8 calibrated on 300 training images.
Pruning: PolynomialDecay(0.0, --sparsity, 0, --ramp_steps, frequency=--frequency),
--round_to, --importance, --scope, optional --group_sparsity (JSON: {"regex": sparsity}).

(a) prune -> strip -> QAT: --prune_epochs at Adam --prune_lr (constant or cosine decay), `strip`,
    `quantize_model`, --qat_epochs at --qat_lr with `FreezeQuantization` after --freeze_epoch
    epochs, convert (no representative data: QAT ranges are used).
(b) prune + QAT in one fit (--variants a,b): `quantize_model(prune(model))`, one fit of
    prune_epochs + qat_epochs; learning rate prune_lr then qat_lr; `strip`; convert.
--distill prune|qat|both: the float model teaches the student (tflite_ext.distillation.distill,
    KL at --temperature, ground-truth weight --alpha) in that stage's fit.
--recalibrate (variant a): BatchNormalization statistics recomputed after strip, as
    tools/compare.py does.
--calibrate: QAT activation ranges set from the training images before the QAT fit.
--freeze_bn_epoch N: folded BN statistics freeze after N QAT epochs, ranges at --freeze_epoch.
--val_fraction F: evaluate on a stratified F of the training images, never the test split
    (for choosing a recipe).

Targets (issue 4, pruned + QAT): int8 acc >= PTQ int8 acc, int8 acc >= float - 0.3 point,
top-1 agreement Keras QAT vs .tflite >= 99.5%, bytes <= 27,797 (issue 3).

Training and measuring go through tflite_ext.bench.variants, as in tools/compare.py.

Usage:
    python tools/bench_prune_qat.py --seeds 0 --seeds 1 --seeds 2 --distill both
    # tools/compare.py's recipe, three seeds, test split:
    python tools/bench_prune_qat.py --seeds 0 --seeds 1 --seeds 2 --distill both --recalibrate \
        --ramp_steps 200 --frequency 100 --qat_lr 1e-4 --freeze_epoch 5
    python tools/bench_prune_qat.py --help
"""
import json
import os
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tflite_ext import convert, inspect, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import variants  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, calibrate, quantize_model  # noqa: E402

SIZE_TARGET = 27_797  # 1/10 of tfmot's 80%-pruned int8 digits model (references.md)
BATCH = 32


def _is_json_object(text):
    try:
        return text is None or isinstance(json.loads(text), dict)
    except ValueError:
        return False


flags.DEFINE_multi_integer("seeds", [0, 1, 2], "Seeds, each its own float model (repeat the "
                           "flag for more).")
flags.DEFINE_string("variants", "a", "a, b or a,b (see the module doc).")
flags.DEFINE_integer("float_epochs", 30, "Float training epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_string("cache_dir", "", "Save/reuse the float model per seed here (speeds up "
                    "sweeps).")
flags.DEFINE_float("sparsity", 0.75, "Final sparsity per group.", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("ramp_steps", 400, "Sparsity ramp end step.", lower_bound=1)
flags.DEFINE_integer("frequency", 50, "Mask update every N steps.", lower_bound=1)
flags.DEFINE_integer("round_to", 8, "Kept channels rounded to a multiple of this.",
                     lower_bound=1)
flags.DEFINE_string("importance", "l2", "l1, l2, bn_scale.")
flags.DEFINE_enum("scope", "local", ["local", "global"], "Channel ranking scope.")
flags.DEFINE_string("group_sparsity", None, "Per-group final sparsity as JSON, e.g. "
                    "'{\"fc1\": 0.5}'.")
flags.register_validator("group_sparsity", _is_json_object,
                         'expected a JSON object, e.g. \'{"fc1": 0.5}\'')
flags.DEFINE_integer("prune_epochs", 15, "Pruning fine-tune epochs.", lower_bound=1)
flags.DEFINE_float("prune_lr", 5e-4, "Pruning fine-tune Adam rate.")
flags.DEFINE_boolean("cosine", False, "Cosine decay of the prune lr.")
flags.DEFINE_integer("qat_epochs", 5, "QAT epochs.", lower_bound=1)
flags.DEFINE_float("qat_lr", 3e-5, "QAT Adam rate.")
flags.DEFINE_integer("freeze_epoch", 3, "Freeze QAT ranges after this many QAT epochs.",
                     lower_bound=0)
flags.DEFINE_integer("freeze_bn_epoch", None, "Freeze folded BN statistics after this many QAT "
                     "epochs (default: with the ranges, at --freeze_epoch).", lower_bound=0)
flags.DEFINE_boolean("recalibrate", False, "Recompute BN statistics after strip (variant a, "
                     "as tools/compare.py does).")
flags.DEFINE_boolean("calibrate", False, "Set QAT activation ranges from the training images "
                     "first.")
flags.DEFINE_float("val_fraction", 0.0, "Evaluate on a stratified fraction of the training "
                   "data instead of the test split (for tuning).", lower_bound=0.0,
                   upper_bound=0.9)
flags.DEFINE_enum("distill", "none", ["none", "prune", "qat", "both"], "Which stage's fit the "
                  "float model teaches.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_float("alpha", 0.5, "Weight of the ground-truth loss when distilling.")
FLAGS = flags.FLAGS


def prune(model, args):
    schedule = pruning.PolynomialDecay(0.0, args.sparsity, 0, args.ramp_steps,
                                       frequency=args.frequency)
    groups = json.loads(args.group_sparsity) if args.group_sparsity else None
    return pruning.prune(model, schedule, round_to=args.round_to, importance=args.importance,
                         scope=args.scope, group_sparsity=groups)


def learning_rate(lr, epochs, steps, cosine):
    if not cosine:
        return lr
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps, alpha=0.05)


def train(student, teacher, data, args, *, distill, lr, epochs, callbacks):
    """Fits `student` (optionally distilled from `teacher`); returns the trained student."""
    return variants.fit(student, data, epochs=epochs, learning_rate=lr, batch_size=BATCH,
                        teacher=teacher if distill else None, temperature=args.temperature,
                        alpha=args.alpha, callbacks=callbacks)


def float_model(seed, data, args):
    """The float teacher for `seed` (trained, or read from --cache_dir)."""
    name = f"digits_float_seed{seed}_val{args.val_fraction}.keras"  # one per training split
    return variants.train_or_load(args.cache_dir and os.path.join(args.cache_dir, name),
                                  models.digits_cnn, data, seed=seed, epochs=args.float_epochs,
                                  learning_rate=1e-3, batch_size=BATCH)


def measure(qat, data):
    """Converts a QAT model; returns (int8 acc, keras acc, bytes, agreement, full_integer,
    indices of the test images the .tflite gets wrong)."""
    flatbuffer = convert.to_tflite(qat).flatbuffer
    keras_top1 = variants.top1(qat, data.x_test)
    top1 = variants.top1(flatbuffer, data.x_test)
    return (np.mean(top1 == data.y_test), np.mean(keras_top1 == data.y_test), len(flatbuffer),
            np.mean(top1 == keras_top1), inspect.summary(flatbuffer)["full_integer"],
            np.flatnonzero(top1 != data.y_test).tolist())


def variant_a(model, data, args, steps):
    """prune -> strip -> QAT; returns (QAT model, float accuracy of the stripped model)."""
    pruned = prune(model, args)
    lr = learning_rate(args.prune_lr, args.prune_epochs, steps, args.cosine)
    train(pruned, model, data, args, distill=args.distill in ("prune", "both"), lr=lr,
          epochs=args.prune_epochs, callbacks=[pruning.PruningCallback()])
    small = pruning.strip(pruned)
    if args.recalibrate:
        pruning.recalibrate_batch_norm(small, data.x_train, BATCH)
    pruned_acc = variants.accuracy(small, data.x_test, data.y_test)
    qat = quantize_model(small)
    if args.calibrate:
        calibrate(qat, data.x_train, BATCH)
    train(qat, model, data, args, distill=args.distill in ("qat", "both"), lr=args.qat_lr,
          epochs=args.qat_epochs, callbacks=qat_freezing(args, steps))
    return qat, pruned_acc


def qat_freezing(args, steps, offset_epochs=0):
    """FreezeQuantization callbacks: BN statistics after --freeze_bn_epoch (default: with the
    ranges), ranges after --freeze_epoch QAT epochs."""
    ranges_at = (offset_epochs + args.freeze_epoch) * steps
    if args.freeze_bn_epoch is None:
        return [FreezeQuantization(ranges_at)]
    return [FreezeQuantization((offset_epochs + args.freeze_bn_epoch) * steps,
                               freeze_ranges=False),
            FreezeQuantization(ranges_at, freeze_batch_norm=False)]


def variant_b(model, data, args, steps):
    """prune + QAT in one fit, then strip; returns (QAT model, nan)."""
    qat = quantize_model(prune(model, args))
    if args.calibrate:
        calibrate(qat, data.x_train, BATCH)
    lr = keras.callbacks.LearningRateScheduler(
        lambda epoch, _: args.prune_lr if epoch < args.prune_epochs else args.qat_lr)
    train(qat, model, data, args, distill=args.distill != "none", lr=args.prune_lr,
          epochs=args.prune_epochs + args.qat_epochs,
          callbacks=[pruning.PruningCallback(), lr, *qat_freezing(args, steps, args.prune_epochs)])
    return pruning.strip(qat), float("nan")  # one fit: no float pruned model to measure


def run_seed(seed, data, args):
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(data.x_train) / BATCH))
    model = float_model(seed, data, args)
    float_acc = variants.accuracy(model, data.x_test, data.y_test)
    ptq = convert.to_tflite(model, data.x_train[:300]).flatbuffer
    ptq_acc = variants.accuracy(ptq, data.x_test, data.y_test)
    rows = []
    for name in args.variants.split(","):
        keras.utils.set_random_seed(seed)
        start = time.time()
        qat, pruned_acc = {"a": variant_a, "b": variant_b}[name](model, data, args, steps)
        seconds = time.time() - start
        acc, keras_acc, size, agree, full_int, wrong = measure(qat, data)
        ok = {"int8>=PTQ": acc >= ptq_acc - 1e-9,
              "int8>=float-0.3": acc >= float_acc - 0.003 - 1e-9,
              "agree>=99.5%": agree >= 0.995, f"bytes<={SIZE_TARGET:,}": size <= SIZE_TARGET}
        rows.append(dict(seed=seed, variant=name, float=float_acc, ptq=ptq_acc, int8=acc,
                         pruned=pruned_acc, wrong=wrong,
                         keras=keras_acc, bytes=size, agree=agree, full_int=full_int,
                         seconds=seconds, ok=ok))
        print_row(rows[-1], flush=True)
    return rows


HEADER = (f"{'seed':>4} {'var':>3} {'float':>7} {'PTQ':>7} {'pruned':>7} {'int8':>7} "
          f"{'kerasQAT':>8} "
          f"{'bytes':>7} {'agree':>7} {'secs':>5}  targets")


def print_row(r, flush=False, show_wrong=True):
    failed = [k for k, v in r["ok"].items() if not v]
    print(f"{r['seed']:>4} {r['variant']:>3} {r['float']:.4f} {r['ptq']:.4f} {r['pruned']:>7.4f} "
          f"{r['int8']:.4f} "
          f"{r['keras']:>8.4f} {r['bytes']:>7,} {r['agree']:.4f} {r['seconds']:>5.0f}  "
          + ("ALL MET" if not failed else "FAIL: " + ", ".join(failed))
          + ("" if r["full_int"] else "  (not full integer!)")
          + (f"  wrong={r['wrong']}" if show_wrong else ""), flush=flush)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    args = FLAGS
    print(" ".join(f"{f.name}={f.value}" for f in FLAGS.get_key_flags_for_module(sys.argv[0])),
          flush=True)

    data = tasks.validation_split(tasks.digits(), args.val_fraction)
    split = (f"validation ({args.val_fraction:.0%} of train)" if args.val_fraction
             else "the test split")
    print(f"evaluated on {split}: {len(data.x_train)} train / {len(data.x_test)} evaluation "
          "images", flush=True)
    print(HEADER, flush=True)
    rows = [r for seed in args.seeds for r in run_seed(seed, data, args)]
    print("\nsummary\n" + HEADER)
    for r in rows:
        print_row(r, show_wrong=False)
    for name in args.variants.split(","):
        mine = [r for r in rows if r["variant"] == name]
        met = sum(all(r["ok"].values()) for r in mine)
        print(f"variant {name}: all targets met on {met}/{len(mine)} seeds; mean int8 "
              f"{np.mean([r['int8'] for r in mine]):.4f}, "
              f"mean {np.mean([r['seconds'] for r in mine]):.0f} s")


if __name__ == "__main__":
    app.run(main)
