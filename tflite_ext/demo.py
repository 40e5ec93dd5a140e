"""`tflite-ext demo`: the whole flow on the built-in reference task, as a pipeline of stages.

Each stage is a plain function of a `DemoContext` that may add a `Variant` (a converted model);
`evaluate` then measures every variant the same way and `report` writes the results.

The output folder appears complete or not at all: everything is written into a temporary
folder beside it, renamed into place at the end (`files.atomic_folder`). This module imports
TensorFlow only when a stage runs, so `plan` and the output checks answer at once.

Example:
    >>> from tflite_ext import demo
    >>> report = demo.run(out_dir="build/demo", quick=True)
    >>> [v["name"] for v in report["variants"]]
    ['float32', 'int8_ptq', ...]
"""
import dataclasses
import os
import time

from tflite_ext.errors import InputError
from tflite_ext.files import atomic_folder, atomic_write, ensure_writable_dir, replaceable_folder

# Budgets from references.md (the tfmot figures were measured with these).
EPOCHS = {"train": 30, "prune": 15, "qat": 5, "factorize": 5, "cluster": 10}
# BatchNorm moving statistics need ~15 epochs to settle before test accuracy means anything.
QUICK_EPOCHS = {"train": 15, "prune": 4, "qat": 2, "factorize": 2, "cluster": 2}
PRUNE_SPARSITY = 0.75  # tools/bench_pruning.py: 0.8 costs 1.1 points, 0.75 costs 0.4
PRUNE_LEARNING_RATE = 5e-4
DISTILL_TEMPERATURE, DISTILL_ALPHA = 4.0, 0.5  # alpha weighs the labels, 1 - alpha the teacher
QAT_LEARNING_RATE = 3e-5  # tools/bench_qat.py: 1e-4 lost one test image on one seed
FACTORIZE_MACS = 0.7  # of the stripped model's MACs, by spatial SVD / SVD, ranks x8
FACTORIZE_LEARNING_RATE = 3e-4
CALIBRATION_SAMPLES = 300


@dataclasses.dataclass
class Variant:
    """One converted model: where it came from and, after `evaluate`, what it measured."""

    name: str
    description: str
    tflite: bytes
    keras_model: object = None
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DemoContext:
    """What stages share: the data, the trained float model and the variants so far."""

    out_dir: str
    quick: bool
    seed: int
    log: callable
    data: object = None
    model: object = None
    stripped: object = None
    variants: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    report: dict = dataclasses.field(default_factory=dict)

    def epochs(self, stage):
        return (QUICK_EPOCHS if self.quick else EPOCHS)[stage]

    def add(self, variant):
        self.variants[variant.name] = variant
        self.log(f"  {variant.name}: {len(variant.tflite):,} bytes")


def fit(ctx, model, stage, epochs, learning_rate, callbacks=(), teach=True):
    """`variants.fit` on the task, one line per epoch; the float model teaches if `teach`."""
    from tflite_ext.bench import variants

    return variants.fit(model, ctx.data, epochs=epochs, learning_rate=learning_rate,
                        teacher=ctx.model if teach else None, temperature=DISTILL_TEMPERATURE,
                        alpha=DISTILL_ALPHA, callbacks=callbacks, label=f"  {stage}",
                        log=ctx.log)


def to_int8(ctx, model):
    """Full-int8 conversion with calibration on the training split."""
    from tflite_ext import convert

    return convert.to_tflite(model, ctx.data.x_train[:CALIBRATION_SAMPLES]).flatbuffer


# ----------------------------------------------------------------------------- stages

def stage_train(ctx):
    """Trains the reference digits CNN (references.md: Adam 1e-3, batch 32)."""
    import keras

    from tflite_ext import convert, models

    keras.utils.set_random_seed(ctx.seed)
    ctx.model = fit(ctx, models.digits_cnn(ctx.data.input_shape), "train",
                    ctx.epochs("train"), 1e-3, teach=False)
    ctx.add(Variant("float32", "Keras float model, no quantization",
                    convert.to_tflite(ctx.model, mode="float32").flatbuffer, ctx.model))


def stage_ptq(ctx):
    """Post-training full-integer quantization, and where it costs precision, layer by layer."""
    from tflite_ext.quantization import debug

    flatbuffer = to_int8(ctx, ctx.model)
    ctx.add(Variant("int8_ptq", "post-training full-int8 (calibrated on 300 train images)",
                    flatbuffer, ctx.model))
    errors = debug.layer_error_report(ctx.model, flatbuffer, ctx.data.x_test[:100])
    ctx.report["quantization_error"] = errors
    ctx.log(f"  layers int8 hurts most: {', '.join(errors['worst'][:3])}")


def stage_prune(ctx):
    """Structured pruning of whole filters and neurons during fit, then strip and int8."""
    from tflite_ext import pruning

    steps_per_epoch = -(-len(ctx.data.x_train) // 32)
    end = min(400, (ctx.epochs("prune") - 1) * steps_per_epoch)  # ramp, then recover
    schedule = pruning.PolynomialDecay(0.0, PRUNE_SPARSITY, 0, end, frequency=min(50, end // 4))
    # The float model teaches its compressed copy (tools/bench_prune_qat.py: +0.1 point).
    pruned = fit(ctx, pruning.prune(ctx.model, schedule, round_to=8), "prune",
                 ctx.epochs("prune"), PRUNE_LEARNING_RATE, [pruning.PruningCallback()])
    ctx.stripped = pruning.strip(pruned)
    pruning.recalibrate_batch_norm(ctx.stripped, ctx.data.x_train)  # BN after pruning
    before, after = pruning.count_macs(ctx.model), pruning.count_macs(ctx.stripped)
    ctx.log(f"  strip: {ctx.model.count_params():,} -> {ctx.stripped.count_params():,} "
            f"parameters, {before:,} -> {after:,} MACs")
    ctx.add(Variant("int8_pruned", f"{PRUNE_SPARSITY:.0%} of channels removed per group "
                    f"(L2, multiples of 8), {ctx.epochs('prune')} epochs at "
                    f"{PRUNE_LEARNING_RATE:g} taught by the float model, stripped, int8",
                    to_int8(ctx, ctx.stripped), ctx.stripped))


def stage_prune_qat(ctx):
    """QAT of the stripped (physically smaller) model: the smallest, most accurate int8."""
    qat, flatbuffer = quantization_aware(ctx, ctx.stripped, "prune_qat")
    ctx.add(Variant("int8_pruned_qat", "the stripped model fine-tuned with QAT, int8",
                    flatbuffer, qat))


def quantization_aware(ctx, model, stage):
    """QAT fine-tune of `model`; ranges and BN statistics freeze after 60% of the steps."""
    from tflite_ext import convert
    from tflite_ext.quantization import FreezeQuantization, quantize_model

    epochs = ctx.epochs("qat")
    steps = epochs * -(-len(ctx.data.x_train) // 32)
    qat = fit(ctx, quantize_model(model), stage, epochs, QAT_LEARNING_RATE,
              [FreezeQuantization(freeze_after_step=int(0.6 * steps))])
    # No representative data: the fake-quant ranges learned in training are the int8 scales.
    return qat, convert.to_tflite(qat).flatbuffer


def stage_qat(ctx):
    """Quantization-aware fine-tuning of the float model, converted without calibration."""
    qat, flatbuffer = quantization_aware(ctx, ctx.model, "qat")
    ctx.add(Variant("int8_qat", f"QAT, {ctx.epochs('qat')} epochs at {QAT_LEARNING_RATE:g} "
                    "taught by the float model; int8 scales from the trained fake-quant ranges",
                    flatbuffer, qat))


def stage_factorize(ctx):
    """Low-rank factorization of the stripped model (SVD, spatial SVD), then QAT and int8."""
    from tflite_ext import factorization

    chosen = factorization.plan(ctx.stripped, mac_budget=FACTORIZE_MACS, round_to=8,
                                layers=lambda layer: layer.name != "logits")
    small = factorization.factorize(ctx.stripped, rank=chosen.ranks, verbose=False)
    ctx.log(f"  factorize: ranks {chosen.ranks}; {small.count_params():,} parameters, "
            f"{chosen.model_macs[1]:,} MACs")
    fit(ctx, small, "factorize", ctx.epochs("factorize"), FACTORIZE_LEARNING_RATE)
    qat, flatbuffer = quantization_aware(ctx, small, "factorize_qat")
    ctx.add(Variant("int8_pruned_factorized_qat",
                    f"the stripped model factorized to {FACTORIZE_MACS:.0%} of its MACs (ranks "
                    f"x8), {ctx.epochs('factorize')} epochs at {FACTORIZE_LEARNING_RATE:g} and "
                    "QAT, taught by the float model, int8", flatbuffer, qat))


def stage_cluster(ctx):
    """Weight clustering during QAT of the stripped model, then TFLite Micro LUT compression."""
    from tflite_ext import clustering, convert
    from tflite_ext.quantization import quantize_model

    # tools/compare.py's digits recipe: 4 values per conv2/conv3 channel, 8 for fc1.
    clustered = clustering.cluster(quantize_model(ctx.stripped), {"conv[23]": 4, "fc1": 8},
                                   per_channel={"conv.*": True}, init="linear")
    fit(ctx, clustered, "cluster", ctx.epochs("cluster"), 1e-4,
        [clustering.ClusteringCallback(update_every=50)])
    final = clustering.strip_clustering(clustered)
    result = convert.to_tflite(final, lut=True, lut_data=ctx.data.x_test)
    ctx.add(Variant("int8_pruned_qat_cluster", "the stripped model clustered during QAT "
                    "(4 values per conv channel, 8 for fc1), int8", result.flatbuffer, final))
    lut = result.lut.report
    atomic_write(os.path.join(ctx.out_dir, "model.lut.tflite"), result.lut.flatbuffer)
    ctx.report["lut"] = {"file": "model.lut.tflite", **lut}
    ctx.log(f"  LUT copy for TFLite Micro: {lut['bytes']:,} bytes (int8 {lut['bytes_before']:,}),"
            f" TFLM outputs identical on {lut['verified']['samples']} test images; "
            "model.lut.tflite (LiteRT cannot run it)")


def stage_evaluate(ctx):
    """Measures every variant alike: accuracy, bytes, gzip bytes, MACs, LiteRT latency."""
    from tflite_ext.bench import variants

    measured = variants.measure(
        {n: v.tflite for n, v in ctx.variants.items()}, ctx.data.x_test, ctx.data.y_test,
        keras_models={n: v.keras_model for n, v in ctx.variants.items()},
        runs=60 if ctx.quick else 400, log=lambda line: ctx.log("  " + line))
    for name, metrics in measured.items():
        ctx.variants[name].metrics.update(metrics)


def stage_report(ctx):
    """Writes model.tflite (the last, most compressed variant), reports and plots."""
    from tflite_ext.bench import report, variants

    final = list(ctx.variants.values())[-1]
    for v in ctx.variants.values():
        atomic_write(os.path.join(ctx.out_dir, f"{v.name}.tflite"), v.tflite)
    atomic_write(os.path.join(ctx.out_dir, "model.tflite"), final.tflite)
    ctx.report.update({
        "task": "scikit-learn digits, 8x8x1, 70/30 stratified split (random_state=0)",
        "quick": ctx.quick,
        "model_tflite": final.name,
        "variants": [{"name": v.name, "description": v.description, **v.metrics}
                     for v in ctx.variants.values()],
        "stage_seconds": ctx.timings,
        "versions": variants.environment(),
    })
    report.write_report(ctx.out_dir, "report", ctx.report, render_markdown(ctx.report))
    report.plot_variants([{"name": v["name"], "accuracy": v["tflite_accuracy"],
                           "size_bytes": v["bytes"], "latency_us": v["median_us"]}
                          for v in ctx.report["variants"]], ctx.out_dir)


STAGES = {  # name: (function, stages it needs); run in this order
    "train": (stage_train, ()),
    "ptq": (stage_ptq, ("train",)),
    "qat": (stage_qat, ("train",)),
    "prune": (stage_prune, ("train",)),
    "factorize": (stage_factorize, ("prune",)),
    "cluster": (stage_cluster, ("prune",)),
    "prune_qat": (stage_prune_qat, ("prune",)),   # last: model.tflite is LiteRT's best int8
    "evaluate": (stage_evaluate, ("train",)),
    "report": (stage_report, ()),
}
ALWAYS = ("evaluate", "report")


# ----------------------------------------------------------------------------- running

def plan(stages=None):
    """The ordered stage names to run for a selection (dependencies and ALWAYS included)."""
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"Unknown demo stage(s) {', '.join(unknown)}; expected some of: "
                         f"{', '.join(STAGES)}")
    wanted = set(ALWAYS)

    def need(name):
        wanted.add(name)
        for dep in STAGES[name][1]:
            need(dep)

    for s in stages:
        need(s)
    return [s for s in STAGES if s in wanted]


def run(out_dir="build/demo", quick=False, stages=None, seed=0, log=print):
    """Runs the demo pipeline; returns the report dict (also written to out_dir).

    `out_dir` is created whole at the end, replacing an earlier demo's output there; a folder
    holding other files is refused before any work (`check_out_dir`).
    """
    order = plan(stages)
    check_out_dir(out_dir)
    with atomic_folder(out_dir) as tmp:
        report = _run(tmp, order, quick, seed, log)
    log(f"\nwrote {os.path.join(out_dir, 'model.tflite')} ({report['model_tflite']}), "
        f"report.json, report.md in {out_dir}")
    return report


_OUTPUT_SUFFIXES = (".tflite", ".json", ".md", ".png")  # all the demo writes


def check_out_dir(out_dir):
    """Checks that `out_dir` is new, empty or an earlier demo's output (so it may be replaced)
    and that its parent folder is writable; raises a one-line InputError otherwise."""
    replaceable_folder(out_dir, lambda name: name.endswith(_OUTPUT_SUFFIXES))
    ensure_writable_dir(os.path.dirname(os.path.abspath(out_dir)))
    return out_dir


def _run(out_dir, order, quick, seed, log):
    from tflite_ext import tasks

    ctx = DemoContext(out_dir=out_dir, quick=quick, seed=seed, log=log)
    ctx.data = tasks.digits()
    log(f"tflite-ext demo: digits CNN, {len(ctx.data.x_train)} train / {len(ctx.data.x_test)} "
        f"test images{' (quick mode)' if quick else ''}; stages: {', '.join(order)}")
    for i, name in enumerate(order, 1):
        log(f"[{i}/{len(order)}] {name}: {STAGES[name][0].__doc__.splitlines()[0]}")
        start = time.perf_counter()
        STAGES[name][0](ctx)
        ctx.timings[name] = round(time.perf_counter() - start, 2)
    log("")
    log(render_table(ctx.report))
    return ctx.report


_COLUMNS = [("name", "variant"), ("keras_accuracy", "keras acc", "{:.4f}"),
            ("tflite_accuracy", "tflite acc", "{:.4f}"), ("bytes", "bytes", "{:,}"),
            ("gzip_bytes", "gzip bytes", "{:,}"), ("macs", "MACs", "{:,}"),
            ("median_us", "median µs", "{:.1f}"),
            ("full_integer", "full int", lambda full: "yes" if full else "no")]


def render_table(report):
    """A fixed-width text table of the variants."""
    from tflite_ext.bench.report import text_table

    return text_table(report["variants"], _COLUMNS)


def render_markdown(report):
    """The report as Markdown: the variants table and how it was measured."""
    from tflite_ext.bench.report import markdown_table

    lines = ["# tflite-ext demo", "", f"Task: {report['task']}.", "",
             markdown_table(report["variants"], _COLUMNS).rstrip("\n")]
    lines += ["", ("Latency: LiteRT, 1 thread, median per-sample µs, all variants timed "
                   "interleaved in one process."), "",
              ("![accuracy vs size](accuracy_vs_size.png) "
               "![accuracy vs latency](accuracy_vs_latency.png)"), "",
              "Variants:"] + [f"- `{v['name']}`: {v['description']}" for v in report["variants"]]
    if report.get("quantization_error"):
        from tflite_ext.quantization import debug

        lines += ["", "## Where post-training int8 loses precision (first 100 test images)", "",
                  debug.render_markdown(report["quantization_error"], top=6)]
    if report.get("quick"):
        lines += ["", "Quick mode: few epochs, figures are not representative."]
    return "\n".join(lines) + "\n"
