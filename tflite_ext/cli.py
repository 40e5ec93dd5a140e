"""The `tflite-ext` command: thin over the library, one absl FlagValues per subcommand.

Every error is one line on stderr, `tflite-ext COMMAND: error: <what, and what to do>`, and
paths and flags are checked before TensorFlow is imported (a typo answers in well under a
second, not after a multi-second import). Exit codes:

    0    done
    1    the work ran but failed: a device run failed (android), or the system refused a read
         or write mid-work (disk full, permissions changed)
    2    bad usage or input: a flag, path, file, or a model that cannot be converted as asked
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM). Temporary files are removed and no
         output is partial. SIGKILL leaves `.tmp-tflite_ext-<pid>-*` beside the output,
         removed by the next run there.

Example:
    $ tflite-ext demo --quick
    $ tflite-ext convert model.keras --data calib.npy -o model.tflite
    $ tflite-ext inspect model.tflite --json
"""
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import textwrap
import threading

from absl import flags

from tflite_ext.errors import InputError, TfliteExtError

PROG = "tflite-ext"


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `define_flags(fv)` declares its flags, `main(fv, args) -> exit code`."""

    name: str
    help: str
    define_flags: callable
    main: callable
    args: str = ""  # positional arguments, for the usage line


# ----------------------------------------------------------------------------- demo

def _demo_flags(fv):
    flags.DEFINE_string("out", "build/demo", "Output folder for model.tflite, report.json, "
                        "report.md and plots.", flag_values=fv)
    flags.DEFINE_boolean("quick", False, "Few epochs and small sweeps: a smoke run in about a "
                         "minute (numbers are not representative).", flag_values=fv)
    flags.DEFINE_list("stages", None, "Run only these stages, comma separated (default: all). "
                      "Stages that need an earlier one run it too.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed for weights and shuffling.", flag_values=fv)
    flags.DEFINE_boolean("json", False, "Print the report as JSON instead of a table.",
                         flag_values=fv)


def _demo_main(fv, args):
    from tflite_ext import demo
    from tflite_ext.files import private_tempdir

    _no_positionals(args)
    if fv.stages == []:  # --stages= would silently mean every stage
        raise InputError(f"--stages is empty: name some of {', '.join(demo.STAGES)}, or "
                         f"leave it out for all. Received: --stages=''")
    demo.plan(fv.stages)
    demo.check_out_dir(fv.out)
    with private_tempdir(os.path.dirname(os.path.abspath(fv.out))):
        import_tensorflow()
        report = demo.run(out_dir=fv.out, quick=fv.quick, stages=fv.stages, seed=fv.seed,
                          log=_stderr if fv.json else print)
    if fv.json:
        print(json.dumps(report, indent=2))
    return 0


# ----------------------------------------------------------------------------- convert

def _convert_flags(fv):
    flags.DEFINE_string("data", None, "Representative dataset for calibration: a .npy file "
                        "(N, *input_shape) or a .npz with one array per input, keyed by input "
                        "name. Not needed for quantization-aware models or float modes.",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "Where to write the .tflite (default: the model path "
                        "with a .tflite suffix).", short_name="o", flag_values=fv)
    flags.DEFINE_enum("mode", "int8", ["int8", "int16x8", "float16", "dynamic", "float32"],
                      "int8: full integer; int16x8: int16 activations, int8 weights; float16: "
                      "half-precision weights; dynamic: int8 weights, float activations; "
                      "float32: no quantization.", flag_values=fv)
    flags.DEFINE_enum("io", None, ["int8", "uint8", "int16", "float32"], "Model input/output "
                      "type (default: int8 for int8, int16 for int16x8, float32 otherwise).",
                      flag_values=fv)
    flags.DEFINE_list("allow_float", [], "Op types or tensor names that may stay float in an "
                      "integer mode (float fallback is refused otherwise).", flag_values=fv)
    flags.DEFINE_integer("samples", 300, "Calibration samples to use at most.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_boolean("json", False, "Print the verification report as JSON.",
                         flag_values=fv)
    flags.DEFINE_boolean("lut", False, "Also write <output>.lut.tflite for TensorFlow Lite "
                         "Micro: int8 tensors with at most 2^b values (a clustered model's) as "
                         "b-bit indices plus value tables, proven bit-identical in TFLM on "
                         "--lut_data (LiteRT cannot run it).", flag_values=fv)
    flags.DEFINE_integer("lut_bits", 7, "Widest LUT index (bits) --lut may use.", lower_bound=1,
                         upper_bound=7, flag_values=fv)
    flags.DEFINE_string("lut_data", None, "Float samples (.npy/.npz) on which TFLM must give "
                        "identical outputs for both files (default: --data).", flag_values=fv)
    flags.DEFINE_boolean("strip_names", False, "Leave tensor names, signatures and the "
                         "description out of the written files: TFLM never reads them, and on "
                         "a small model they are a sixth of the flash.", flag_values=fv)


def _convert_main(fv, args):
    from tflite_ext import convert, inspect
    from tflite_ext.files import ensure_writable_dir, private_tempdir

    model_path = convert.check_model_path(
        _one_positional(args, "MODEL (.keras file or SavedModel folder)"))
    for data in (fv.data, fv.lut_data):
        if data is not None:
            convert.check_array_file(data)
    output = fv.output or os.path.splitext(model_path.rstrip("/"))[0] + ".tflite"
    if os.path.isdir(output):
        raise InputError(f"--output is a folder; expected a .tflite file path. "
                         f"Received: {output!r}")
    out_dir = ensure_writable_dir(os.path.dirname(os.path.abspath(output)))
    # TensorFlow's temporary SavedModel and autograph files go beside the output: removed at
    # the end, and after a SIGKILL found (and removed) there by the next run.
    with private_tempdir(out_dir):
        import_tensorflow()
        result = convert.to_tflite(model_path, fv.data, mode=fv.mode, io_dtype=fv.io,
                                   allow_float=fv.allow_float,
                                   num_calibration_samples=fv.samples,
                                   lut=fv.lut_bits if fv.lut else False, lut_data=fv.lut_data,
                                   strip_names=fv.strip_names)
        result.save(output)
    lut = result.lut
    if fv.json:
        extra = {"lut": {"output": convert.lut_path(output), **lut.report}} if lut else {}
        print(json.dumps({"output": output, **result.report, **extra}, indent=2))
        return 0
    print(inspect.render(result.report))
    print(f"wrote {output} ({len(result.flatbuffer):,} bytes, mode={fv.mode}, "
          f"{_io_types(result.report)})")
    if lut:
        print("\n".join(inspect.render_compressed(inspect.summary(lut.flatbuffer))))
        print(f"wrote {convert.lut_path(output)} ({len(lut.flatbuffer):,} bytes, "
              f"{len(lut.flatbuffer) / len(result.flatbuffer):.0%} of the int8 file; TFLM "
              f"outputs bit-identical on {lut.report['verified']['samples']} samples). It is "
              f"for TensorFlow Lite Micro only: LiteRT has no TFLM_DECODE kernel, use "
              f"{output} there.")
    return 0


def _io_types(report):
    """The I/O types the flatbuffer has (the converter keeps a float output float when it
    cannot quantize it, whatever --io asked for): "io=int8", or "inputs=int8 outputs=float32"."""
    inputs, outputs = ([t["dtype"] for t in report[k]] for k in ("inputs", "outputs"))
    if len(set(inputs + outputs)) == 1:
        return f"io={inputs[0]}"
    return f"inputs={','.join(inputs)} outputs={','.join(outputs)}"


# ----------------------------------------------------------------------------- inspect

def _inspect_flags(fv):
    flags.DEFINE_boolean("json", False, "Print the full summary as JSON.", flag_values=fv)
    flags.DEFINE_integer("top", 12, "How many of the largest constant tensors to list.",
                         lower_bound=0, flag_values=fv)


def _inspect_main(fv, args):
    from tflite_ext import inspect

    path = _one_positional(args, "MODEL.tflite")
    info = inspect.summary(path)
    print(json.dumps(info, indent=2) if fv.json else inspect.render(info, top=fv.top))
    return 0


# ----------------------------------------------------------------------------- plumbing

# ----------------------------------------------------------------------------- compress

def _compress_flags(fv):
    flags.DEFINE_string("data", None, "Training data: an .npz with arrays x and y.",
                        flag_values=fv)
    flags.DEFINE_string("val", None, "Validation data the search decides on: an .npz with x "
                        "and y (keep a test split apart to report).", flag_values=fv)
    flags.DEFINE_string("target", "host", "Where the budget holds: host[:THREADS], reference, "
                        "micro, ethos-u55-128 (any vela configuration), android[:SERIAL].",
                        flag_values=fv)
    flags.DEFINE_string("flash", None, "Flash budget, e.g. 64KB. Each budget may instead be "
                        "a fraction of the unchanged model's, as measured: 0.5x.",
                        flag_values=fv)
    flags.DEFINE_string("arena", None, "RAM (tensor arena) budget, e.g. 32KB.", flag_values=fv)
    flags.DEFINE_string("latency", None, "Latency budget on the target, e.g. 5ms, 400us or "
                        "0.4x (of the unchanged model).", flag_values=fv)
    flags.DEFINE_string("macs", None, "MAC budget, e.g. 3M.", flag_values=fv)
    flags.DEFINE_float("max_drop", 1.0, "Accuracy points the result may lose.", flag_values=fv)
    flags.DEFINE_string("out", "build/compress", "Output folder (and the resumable cache).",
                        flag_values=fv)
    flags.DEFINE_integer("epochs", 10, "Fine-tune epochs of each plan.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("learning_rate", None, "Adam's rate in each plan's fine-tune (default: "
                       "compress's, 1e-3).", lower_bound=0, flag_values=fv)
    flags.DEFINE_boolean("qat", False, "Quantization-aware fine-tune before conversion.",
                         flag_values=fv)
    flags.DEFINE_integer("round_to", 8, "Kept channel counts are multiples of this.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("binary", None, "benchmark_model for the android target.",
                        flag_values=fv)
    flags.DEFINE_list("settings", ["0.25", "0.5", "0.75", "0.875"], "Sparsities each "
                      "dependency group is tried at (removable blocks are also tried removed).",
                      flag_values=fv)
    flags.DEFINE_list("rank_fractions", [], "Fractions of full rank each Dense/Conv layer "
                      "is tried factorized at, e.g. 0.5,0.25 (default: no factorization).",
                      flag_values=fv)
    flags.DEFINE_list("clusters", ["16", "8", "4"], "Shared values per kernel each layer is "
                      "tried clustered at, on targets that run LUT-compressed weights (micro); "
                      "empty: no clustering.", flag_values=fv)
    flags.DEFINE_integer("shortlist", 3, "Plans kept for the full fine-tunes: the first is "
                         "fine-tuned; if it falls short, the others are ranked by a short "
                         "fine-tune first.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_rounds", 3, "Plans fine-tuned at most.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Every fine-tune starts from this seed.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_boolean("keep_names", False, "micro: keep tensor names and signatures in "
                         "the deployed file (TFLM never reads them; by default they go).",
                         flag_values=fv)
    flags.DEFINE_boolean("json", False, "Print the result as JSON.", flag_values=fv)


def _numbers(flag, values, kind=float):
    """The numbers of a comma-separated flag, or a one-line InputError naming the bad one."""
    out = []
    for text in values:
        try:
            out.append(kind(text))
        except ValueError:
            raise InputError(f"--{flag} takes comma-separated {kind.__name__}s. Received: "
                             f"--{flag}={','.join(values)}") from None
    return tuple(out)


def _compress_main(fv, args):
    from tflite_ext import convert
    from tflite_ext.files import ensure_writable_dir, private_tempdir

    model_path = convert.check_model_path(_one_positional(args, "MODEL (.keras file)"))
    for name, value in (("--data", fv.data), ("--val", fv.val)):
        if value is None:
            raise InputError(f"{name} is required: an .npz with arrays x and y")
        convert.check_array_file(value, what=f"{name} data")
    if fv.keep_names and fv.target != "micro":
        raise InputError(f"--keep_names is for --target micro (the other targets keep names). "
                         f"Received: --target {fv.target}")
    options = dict(settings=_numbers("settings", fv.settings),
                   rank_fractions=_numbers("rank_fractions", fv.rank_fractions),
                   clusters=_numbers("clusters", fv.clusters, int))
    if fv.learning_rate is not None:
        options["learning_rate"] = fv.learning_rate
    ensure_writable_dir(fv.out)
    with private_tempdir(os.path.dirname(os.path.abspath(fv.out))):
        import_tensorflow()
        from tflite_ext.compress import Budget, compress, get_target, targets

        budget = Budget.parse(flash=fv.flash, arena=fv.arena, latency=fv.latency,
                              macs=fv.macs)
        target = (targets.Micro(strip_names=False) if fv.keep_names  # micro: checked above
                  else get_target(fv.target, binary=fv.binary))
        result = compress(convert.load_model(model_path), fv.data, fv.val, budget,
                          target=target, max_accuracy_drop=fv.max_drop, out_dir=fv.out,
                          epochs=fv.epochs, qat=fv.qat, round_to=fv.round_to,
                          shortlist=fv.shortlist, max_rounds=fv.max_rounds, seed=fv.seed,
                          log=_stderr if fv.json else print, **options)
    summary = {"out": fv.out, "measured": result.measured, "accuracy": result.accuracy,
               "base_accuracy": result.base_accuracy, "plan": result.plan}
    if fv.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"met {budget} on {fv.target}: " + ", ".join(
            f"{k} {v:,.1f}" for k, v in result.measured.items() if isinstance(v, (int, float)))
            + f"; int8 accuracy {result.accuracy:.4f} (unchanged model {result.base_accuracy:.4f})"
            f"; wrote {fv.out}/model.tflite, model.keras, plan.json, report.md")
    return 0


def _commands():
    commands = [
        Command("demo", "Train the reference digits CNN, compress it, convert to full int8, "
                "verify, evaluate and time it; write a report.", _demo_flags, _demo_main),
        Command("convert", "Convert a .keras file or SavedModel folder to a verified .tflite "
                "(full int8 by default).", _convert_flags, _convert_main, "MODEL"),
        Command("inspect", "Describe a .tflite: ops, dtypes, quantization, constant bytes, "
                "MACs, and whether it is full integer.", _inspect_flags, _inspect_main,
                "MODEL.tflite"),
        Command("compress", "Find and build the int8 model that meets a flash/RAM/latency/MAC "
                "budget, measured on the target.", _compress_flags, _compress_main,
                "MODEL.keras"),
    ]
    try:
        from tflite_ext.bench.commands import COMMANDS as bench_commands
    except ImportError:  # the benchmarking commands are optional only while being built
        bench_commands = []
    commands += [Command(c.name, c.help, c.define_flags, _adapt(c.main), "[MODEL]")
                 for c in bench_commands]
    return {c.name: c for c in commands}


def _adapt(main):
    """Bench commands name their model with --model; accept it as a positional too."""
    def call(fv, args):
        if len(args) == 1 and "model" in fv and fv["model"].value is None:
            fv["model"].value, args = args[0], []
        _no_positionals(args)
        return main(fv)
    return call


def _no_positionals(args):
    if args:
        raise InputError(f"unexpected argument(s): {' '.join(args)}")


def _one_positional(args, what):
    if len(args) != 1:
        raise InputError(f"expected exactly one {what}. Received: {' '.join(args) or 'none'}")
    return args[0]


def _stderr(*parts):
    print(*parts, file=sys.stderr)


def import_tensorflow():
    """Imports TensorFlow without its start-up lines on stderr.

    TensorFlow 2.21 writes "WARNING: All log messages before absl::InitializeLog() is called
    are written to STDERR" and oneDNN/CUDA notices from C++ static initializers of its two
    shared libraries (six lines) whatever TF_CPP_MIN_LOG_LEVEL says, so file descriptor 2 is
    pointed at a scratch file for the import.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.stderr.flush()
    with tempfile.TemporaryFile() as scratch:
        saved = os.dup(2)
        os.dup2(scratch.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # absl's Python WARNINGs from Keras/TF internals


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks remove temporary files."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up runs once, uninterrupted
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _usage(commands):
    width = max(len(n) for n in commands)
    lines = [f"usage: {PROG} COMMAND [--flags]", "",
             "Structured pruning, QAT and verified full-integer TFLite for Keras 3.", "",
             "commands:"]
    for name, c in commands.items():
        lines += textwrap.wrap(c.help, 96, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    lines += ["", f"Run '{PROG} COMMAND --help' for a command's flags."]
    return "\n".join(lines)


def _command_help(command, fv):
    usage = " ".join(filter(None, [PROG, command.name, command.args, "[--flags]"]))
    lines = [f"usage: {usage}", "", command.help, "", "flags:"]
    for flag in sorted({fv[name].name: fv[name] for name in fv}.values(), key=lambda f: f.name):
        short = f"-{flag.short_name}, " if flag.short_name else ""
        default = "" if flag.default in (None, [], "") else f" (default: {flag.default_as_str})"
        lines.append(f"  {short}--{flag.name}")
        lines += textwrap.wrap(flag.help + default, 88, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def main(argv):
    """Runs the CLI on `argv` (without the program name); returns the exit code."""
    # Quiet TensorFlow's C++ logging before anything imports it (import_tensorflow does the
    # rest).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    command = commands.get(name)
    if command is None:
        _stderr(f"{PROG}: error: unknown command {name!r}; expected one of: "
                f"{', '.join(commands)}")
        return 2
    fv = flags.FlagValues()
    command.define_flags(fv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
        with contextlib.suppress(BrokenPipeError):  # e.g. piped into `head`
            print(_command_help(command, fv))
        return 0
    try:
        with _sigterm_raises():
            positionals = fv([PROG] + rest)[1:]
            return command.main(fv, positionals)
    except (flags.Error, TfliteExtError) as e:
        _stderr(f"{PROG} {name}: error: {_one_line(e)}")
        return 2
    except OSError as e:  # the system refused a read or write mid-work
        target = e.filename2 or e.filename  # a rename's target, not the temporary file
        where = f": {target!r}" if target else ""
        _stderr(f"{PROG} {name}: error: {e.strerror or e}{where}")
        return 1
    except KeyboardInterrupt:
        _stderr(f"{PROG} {name}: interrupted")
        return 130
    except _Terminated:
        _stderr(f"{PROG} {name}: terminated")
        return 128 + signal.SIGTERM


def _one_line(error):
    return " ".join(str(error).split())  # absl's flag errors can span lines


def run():
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":  # python -m tflite_ext.cli
    run()
