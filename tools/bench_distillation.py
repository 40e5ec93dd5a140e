r"""Does distillation pay on the digits? Distilled vs trained alone, same seeds, mean ± spread.

Teacher: the digits CNN of references.md (Adam 1e-3, 30 epochs, batch 32), one per seed.

(a) A small student trained alone vs the same student (same seed, same initial weights,
    same epochs and learning rate) taught by the float teacher (`distillation.fit`, KL at T,
    ground-truth weight alpha; --settings lists the (T, alpha) pairs tried). The student is
    the digits CNN's layout at --width of its channels (64/128/128/256 -> 8/16/16/32 at
    0.125). Float and full-int8 (PTQ, 300 calibration images) test accuracy, int8 bytes.
(b) prune -> strip -> QAT, as tools/compare.py does it (75% of channels per group, multiples
    of 8, ramp 0 -> 0.75 to step 200, masks every 100 steps, 15 epochs at 5e-4, BN
    recalibrated after strip, QAT 5 epochs at 1e-4), with the float model teaching both fits
    vs with no teacher; same seed, same float model, same size. Int8 accuracy and bytes.
    --hints adds feature losses in the pruning fit (names of layers of the digits CNN,
    teacher = student, e.g. conv3: the unstripped student keeps the teacher's widths).

Every figure is printed per seed, then mean ± standard deviation (min-max) over the seeds and
the per-seed difference distilled - alone.

Usage:
    python tools/bench_distillation.py                       # 5 seeds, parts a and b
    python tools/bench_distillation.py --parts a --settings 4:0.5 --settings 2:0.1
    python tools/bench_distillation.py --help
"""
import os
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from tflite_ext import convert, models, pruning, tasks  # noqa: E402
from tflite_ext.bench import host, variants  # noqa: E402
from tflite_ext.quantization import FreezeQuantization, quantize_model  # noqa: E402

BATCH = 32
flags.DEFINE_multi_integer("seeds", [0, 1, 2, 3, 4], "Seeds (repeat the flag), each its own "
                           "teacher.")
flags.DEFINE_string("parts", "a,b", "a, b or a,b (see the module doc).")
flags.DEFINE_integer("float_epochs", 30, "Teacher epochs (Adam 1e-3).", lower_bound=1)
flags.DEFINE_string("cache_dir", "", "Save/reuse the teacher per seed here.")
flags.DEFINE_float("width", 0.125, "Part a: the student's share of the digits CNN's channels.",
                   lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_integer("student_epochs", 30, "Part a: student epochs, alone and distilled.",
                     lower_bound=1)
flags.DEFINE_float("student_lr", 1e-3, "Part a: student Adam rate, alone and distilled.")
flags.DEFINE_boolean("cosine", False, "Part a: cosine decay of the student rate to 5% (both "
                     "arms): the last epoch's weights are then less of a lottery.")
flags.DEFINE_multi_string("settings", ["4:0.5"], "Part a: distillation settings T:alpha "
                          "(repeat the flag); alpha weighs the labels.")
flags.DEFINE_float("temperature", 4.0, "Part b: distillation temperature.")
flags.DEFINE_float("alpha", 0.5, "Part b: ground-truth weight when distilling.")
flags.DEFINE_list("hints", [], "Part b: layers hinted in the pruning fit (teacher = student "
                  "name), e.g. conv3.")
flags.DEFINE_float("hint_weight", 1.0, "Part b: weight of each hint loss.")
FLAGS = flags.FLAGS


def narrow_cnn(width):
    """The digits CNN's layout at `width` of its channels (names as in models.digits_cnn)."""
    c = lambda n: max(1, round(n * width))  # noqa: E731
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(c(64), 3, padding="same", name="conv1")(inputs)
    x = layers.ReLU(name="relu1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Conv2D(c(128), 3, padding="same", name="conv2")(x)
    x = layers.ReLU(name="relu2")(layers.BatchNormalization(name="bn2")(x))
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(c(128), 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(c(256), activation="relu", name="fc1")(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name=f"digits_cnn_x{width}")


def teacher_for(seed, data):
    path = FLAGS.cache_dir and os.path.join(FLAGS.cache_dir, f"digits_float_seed{seed}.keras")
    return variants.train_or_load(path, models.digits_cnn, data, seed=seed,
                                  epochs=FLAGS.float_epochs, learning_rate=1e-3, batch_size=BATCH)


def int8_figures(model, data, calibrate=True):
    """(int8 test accuracy, bytes): PTQ for a float model, the QAT ranges otherwise."""
    flatbuffer = convert.to_tflite(model, data.x_train[:300] if calibrate else None).flatbuffer
    return variants.accuracy(flatbuffer, data.x_test, data.y_test), len(flatbuffer)


def settings():
    pairs = []
    for text in FLAGS.settings:
        t, a = text.split(":")
        pairs.append((float(t), float(a)))
    return pairs


def part_a(seed, teacher, data):
    """{variant: (float acc, int8 acc, bytes)} for the student alone and each setting."""
    rows = {}
    runs = [("alone", None)] + [(f"distilled T={t:g} alpha={a:g}", (t, a)) for t, a in settings()]
    for name, setting in runs:
        keras.utils.set_random_seed(seed)  # the same initial weights and batches for each
        student = narrow_cnn(FLAGS.width)
        t, a = setting or (None, None)
        lr = FLAGS.student_lr
        if FLAGS.cosine:
            steps = -(-len(data.x_train) // BATCH)
            lr = keras.optimizers.schedules.CosineDecay(lr, FLAGS.student_epochs * steps, 0.05)
        variants.fit(student, data, epochs=FLAGS.student_epochs, learning_rate=lr,
                     batch_size=BATCH, teacher=teacher if setting else None,
                     **({"temperature": t, "alpha": a} if setting else {}))
        rows[name] = (variants.accuracy(student, data.x_test, data.y_test),
                      *int8_figures(student, data))
    return rows


def part_b(seed, teacher, data):
    """{variant: (pruned float acc, int8 acc, bytes)}: prune -> strip -> QAT, alone / taught."""
    rows = {}
    steps = -(-len(data.x_train) // BATCH)
    for name, taught in (("prune+QAT alone", False), ("prune+QAT distilled", True)):
        keras.utils.set_random_seed(seed)
        schedule = pruning.PolynomialDecay(0.0, 0.75, 0, 200, frequency=100)
        pruned = pruning.prune(teacher, schedule, layers=lambda layer: layer.name != "logits",
                               round_to=8)
        extra = dict(teacher=teacher, temperature=FLAGS.temperature, alpha=FLAGS.alpha) \
            if taught else {}
        hints = {h: h for h in FLAGS.hints} if taught and FLAGS.hints else None
        variants.fit(pruned, data, epochs=15, learning_rate=5e-4, batch_size=BATCH,
                     callbacks=[pruning.PruningCallback()], hints=hints,
                     hint_weight=FLAGS.hint_weight, **extra)
        small = pruning.strip(pruned)
        pruning.recalibrate_batch_norm(small, data.x_train, BATCH)
        pruned_acc = variants.accuracy(small, data.x_test, data.y_test)
        qat = quantize_model(small)
        variants.fit(qat, data, epochs=5, learning_rate=1e-4, batch_size=BATCH,
                     callbacks=[FreezeQuantization(5 * steps)], **extra)
        rows[name] = (pruned_acc, *int8_figures(qat, data, calibrate=False))
    return rows


def spread(values):
    v = np.asarray(values, float)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.4f} ± {std:.4f} ({v.min():.4f}–{v.max():.4f})"


def summarize(title, columns, per_seed, baseline):
    """Prints per-seed rows, then mean ± std (min–max) per variant and the paired difference."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]])
    print(f"\n### {title}\n")
    print("| seed | variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for seed in seeds:
        for name in names:
            acc, int8, size = per_seed[seed][name]
            print(f"| {seed} | {name} | {acc:.4f} | {int8:.4f} | {size:,} |")
    print(f"\nover {len(seeds)} seeds (mean ± std, min–max):\n")
    print("| variant | " + " | ".join(columns[:2]) + " | bytes | " + columns[1] + " − "
          f"{baseline} | seeds better / tied / worse |")
    print("|---|---|---|---|---|---|")
    for name in names:
        acc = [per_seed[s][name][0] for s in seeds]
        int8 = [per_seed[s][name][1] for s in seeds]
        sizes = sorted({per_seed[s][name][2] for s in seeds})
        diff = [per_seed[s][name][1] - per_seed[s][baseline][1] for s in seeds]
        record = "—" if name == baseline else "{} / {} / {}".format(
            sum(d > 1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff),
            sum(d < -1e-9 for d in diff))
        diff_std = np.std(diff, ddof=1) * 100 if len(diff) > 1 else 0.0
        diff_text = "—" if name == baseline else f"{np.mean(diff) * 100:+.2f} ± {diff_std:.2f} pt"
        print(f"| {name} | {spread(acc)} | {spread(int8)} | "
              f"{', '.join(f'{s:,}' for s in sizes)} | {diff_text} | {record} |")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    parts = set(FLAGS.parts.split(","))
    if not parts <= {"a", "b"}:
        raise app.UsageError(f"--parts takes a, b or a,b. Received: --parts={FLAGS.parts}")
    data = tasks.digits()
    print(f"CPU: {host.describe_cpu()}; seeds {FLAGS.seeds}; {len(data.x_train)} train / "
          f"{len(data.x_test)} test images (one test image is {100 / len(data.x_test):.2f} pt)")
    start = time.time()
    a_rows, b_rows = {}, {}
    for seed in FLAGS.seeds:
        teacher = teacher_for(seed, data)
        line = f"seed {seed}: teacher {variants.accuracy(teacher, data.x_test, data.y_test):.4f}"
        if "a" in parts:
            a_rows[seed] = part_a(seed, teacher, data)
            line += "; a: " + ", ".join(f"{k} {v[1]:.4f}" for k, v in a_rows[seed].items())
        if "b" in parts:
            b_rows[seed] = part_b(seed, teacher, data)
            line += "; b: " + ", ".join(f"{k} {v[1]:.4f}" for k, v in b_rows[seed].items())
        print(f"{line} ({time.time() - start:.0f} s)", flush=True)
    if a_rows:
        summarize(f"(a) student at width {FLAGS.width:g}, {FLAGS.student_epochs} epochs at "
                  f"{FLAGS.student_lr:g}" + (" cosine" if FLAGS.cosine else ""),
                  ["float acc", "int8 acc", "int8 bytes"], a_rows, "alone")
    if b_rows:
        summarize(f"(b) prune -> strip -> QAT, T={FLAGS.temperature:g} alpha={FLAGS.alpha:g}"
                  + (f", hints {FLAGS.hints} x{FLAGS.hint_weight:g}" if FLAGS.hints else ""),
                  ["pruned float acc", "int8 acc", "int8 bytes"], b_rows, "prune+QAT alone")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
