"""How often, and for how long, the pruning flow builds the channel dependency graph.

Runs the flow a user runs on Keras's MobileNetV2 (`weights=None`): `prune`, the callback's
pruning plan and one pruning step, `count_macs` of the float and the pruned model, `strip`,
`count_macs` of the stripped model. Prints the wall time of each step, how many dependency
graphs were built and the seconds spent building them (median of `--repeats` runs).

Example:
    python tools/bench_graph.py
    python tools/bench_graph.py --model resnet8 --repeats 3
"""
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mobilenet_v2", ["mobilenet_v2", "resnet8"], "Model to prune.")
flags.DEFINE_integer("repeats", 5, "Runs of the whole flow; medians are printed.", lower_bound=1)


def _flow(make_model):
    """{step: seconds} of one run of the flow."""
    from tflite_ext import pruning
    from tflite_ext.pruning.plan import PruningPlan

    model = make_model()
    steps = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        steps[name] = time.perf_counter() - start
        return out

    pruned = timed("prune", lambda: pruning.prune(model, 0.5, round_to=8))
    timed("plan + one pruning step", lambda: PruningPlan(pruned).apply(0.5))
    timed("count_macs(float, pruned)",
          lambda: (pruning.count_macs(model), pruning.count_macs(pruned)))
    small = timed("strip", lambda: pruning.strip(pruned))
    timed("count_macs(stripped)", lambda: pruning.count_macs(small))
    return steps


def main(argv):
    del argv
    import keras

    from tflite_ext import models
    from tflite_ext.bench import host
    from tflite_ext.pruning import graph

    make = {"mobilenet_v2": lambda: keras.applications.MobileNetV2(weights=None),
            "resnet8": models.resnet8}[FLAGS.model]
    builds, build_seconds = [], []
    real_init = graph.DependencyGraph.__init__

    def counting_init(self, *args, **kwargs):
        start = time.perf_counter()
        real_init(self, *args, **kwargs)
        builds[-1] += 1
        build_seconds[-1] += time.perf_counter() - start

    graph.DependencyGraph.__init__ = counting_init
    runs = []
    for _ in range(FLAGS.repeats):
        builds.append(0)
        build_seconds.append(0.0)
        runs.append(_flow(make))
    graph.DependencyGraph.__init__ = real_init
    print(f"{FLAGS.model}, {FLAGS.repeats} runs, CPU: {host.describe_cpu()}")
    print("| step | median s |\n|---|---|")
    for step in runs[0]:
        print(f"| {step} | {statistics.median(r[step] for r in runs):.3f} |")
    total = statistics.median(sum(r.values()) for r in runs)
    print(f"| whole flow | {total:.3f} |")
    print(f"dependency graphs built per run: {builds[0]}; "
          f"median {statistics.median(build_seconds):.3f} s building them")


if __name__ == "__main__":
    app.run(main)
