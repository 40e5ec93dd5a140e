"""Weight clustering + TFLite Micro LUT over several seeds: the issue 14 targets as means.

Runs `tools/compare.py --model M --seed S --out build/compare/M_seedS` for each seed whose
compare.json is not there yet (each seed trains its own float model), then prints per seed and
on average: float, pruned + QAT int8, and pruned + QAT + clustered + LUT accuracy and bytes,
tfmot's clustered file and the same file through tflite_ext's LUT stage.

Example:
    python tools/bench_cluster.py --seeds 0,1,2            # the digits CNN, ~15 min
    python tools/bench_cluster.py --model resnet8 --seeds 0
"""
import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_enum("model", "digits_cnn", ["digits_cnn", "resnet8"], "The reference model.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one compare.py run each.")
FLAGS = flags.FLAGS

TOOLS = os.path.dirname(os.path.abspath(__file__))
VARIANTS = [("float32", "float"), ("tflite_ext prune → strip → QAT → int8", "pruned + QAT int8"),
            ("tflite_ext prune → strip → QAT + cluster → int8 LUT (TFLM)",
             "pruned + QAT + cluster + LUT"),
            ("tflite_ext structured prune + strip → int8", "pruned int8"),
            ("tfmot cluster 16 → strip → int8", "tfmot cluster 16 int8"),
            ("tfmot cluster 16 → int8 → tflite_ext LUT (TFLM)", "tfmot cluster 16 + our LUT")]


def result(seed):
    out = os.path.join("build", "compare", f"{FLAGS.model}_seed{seed}")
    path = os.path.join(out, "compare.json")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(TOOLS, "compare.py"), "--model",
                        FLAGS.model, "--seed", str(seed), "--out", out], check=True)
    with open(path) as f:
        return {r["variant"]: r for r in json.load(f)["rows"]}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])}")
    runs = {seed: result(seed) for seed in FLAGS.seeds}
    shown = [(key, label) for key, label in VARIANTS if all(key in r for r in runs.values())]
    print("| seed | " + " | ".join(f"{label} acc | bytes" for _, label in shown) + " |")
    print("|---" * (1 + 2 * len(shown)) + "|")
    for seed, rows in runs.items():
        print(f"| {seed} | " + " | ".join(f"{rows[k]['accuracy']:.4f} | {rows[k]['bytes']:,}"
                                         for k, _ in shown) + " |")
    mean = {k: sum(r[k]["accuracy"] for r in runs.values()) / len(runs) for k, _ in shown}
    print("| mean | " + " | ".join(f"{mean[k]:.4f} | " for k, _ in shown) + " |")
    final, flt = VARIANTS[2][0], VARIANTS[0][0]
    if final in mean:
        drop = (mean[flt] - mean[final]) * 100
        verdict = ""
        if FLAGS.model == "digits_cnn":  # the target for the digits CNN
            verdict = f" (target ≤ 0.5: {'met' if drop <= 0.5 else 'NOT met'})"
        print(f"\nmean accuracy: clustered + LUT {mean[final]:.4f}, float {mean[flt]:.4f}: "
              f"{drop:.2f} point(s) below float{verdict}")
    return 0


if __name__ == "__main__":
    app.run(main)
