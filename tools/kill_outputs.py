"""Kills `tflite-ext convert` and `tflite-ext demo` at random moments and counts what is left.

Each kill runs the command on a fresh output path (the same folder each time, so a run must
clean up after the one killed before it), with a private $TMPDIR, sends SIGTERM or SIGKILL
after a random delay, and then looks at:

- the output: absent, complete (a valid .tflite of the expected size; a demo folder with every
  file an uninterrupted run writes, each .tflite valid) or partial (anything else);
- temporary files the killed run left beside the output, and anything left in its $TMPDIR.

A last uninterrupted run of each command then shows whether leftovers of SIGKILLed runs are
removed by the next run.

Example:
    $ python tools/kill_outputs.py --kills 50
    $ python tools/kill_outputs.py --kills 4 --max_delay 12 --final_kill 4 --json  # the test
    $ python tools/kill_outputs.py --kills 20 --pythonpath /work/main   # an older checkout
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

COMMANDS = {  # name: argv after `tflite-ext`, given the work folder; the output's name
    "convert": (lambda w: ["convert", f"{w}/model.keras", "--data", f"{w}/calib.npy",
                           "-o", f"{w}/out_convert/m.tflite"], "out_convert", "m.tflite"),
    "demo": (lambda w: ["demo", "--quick", "--stages", "train", "--out",
                        f"{w}/out_demo/demo"], "out_demo", "demo"),
}
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


def make_inputs(work):
    """A small conv model (.keras) and 64 calibration samples (.npy) in `work`."""
    from tflite_ext.cli import import_tensorflow

    import_tensorflow()
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(os.path.join(work, "model.keras"))
    np.save(os.path.join(work, "calib.npy"),
            np.random.default_rng(0).random((64, 8, 8, 1), dtype="float32"))


def _env(tmpdir, pythonpath):
    env = dict(os.environ, TMPDIR=tmpdir, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env["PYTHONPATH"] = pythonpath
    return env


def run_once(command, work, tmpdir, pythonpath, delay=None, sig=None):
    """Runs a command; with `delay`, sends `sig` after that many seconds if it still runs.
    Returns (exit code, seconds, whether the signal was sent)."""
    argv = [sys.executable, "-m", "tflite_ext.cli", *COMMANDS[command][0](work)]
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=_env(tmpdir, pythonpath), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sent = False
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        sent = True
        try:
            proc.wait(timeout=120)  # SIGTERM waits for the C++ call in progress to return
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, time.monotonic() - start, sent


def _valid_tflite(path):
    from tflite_ext import inspect
    from tflite_ext.errors import TfliteExtError

    try:
        inspect.summary(path)
    except (TfliteExtError, OSError):
        return False
    return True


def output_state(command, work, size=None):
    """"absent", "complete", "partial" or "partial (empty folder)" for the command's output.

    Complete: convert's file is a valid .tflite (of `size` bytes, an uninterrupted run's, when
    given); demo's folder holds exactly the files its report.json lists (a .tflite per variant,
    model.tflite, report.md, two plots), every .tflite valid."""
    _, folder, name = COMMANDS[command]
    path = os.path.join(work, folder, name)
    if not os.path.exists(path):
        return "absent"
    if command == "convert":
        ok = (size is None or os.path.getsize(path) == size) and _valid_tflite(path)
        return "complete" if ok else "partial"
    if not os.listdir(path):
        return "partial (empty folder)"
    try:
        with open(os.path.join(path, "report.json")) as f:
            variants = json.load(f)["variants"]
    except (OSError, ValueError, KeyError):
        return "partial"
    wanted = {f"{v['name']}.tflite" for v in variants} | {
        "model.tflite", "report.json", "report.md", "accuracy_vs_size.png",
        "accuracy_vs_latency.png"}
    ok = set(os.listdir(path)) == wanted and all(
        _valid_tflite(os.path.join(path, n)) for n in wanted if n.endswith(".tflite"))
    return "complete" if ok else "partial"


def leftovers(command, work):
    """Names beside the output (in its folder) other than the output itself."""
    _, folder, name = COMMANDS[command]
    path = os.path.join(work, folder)
    return sorted(set(os.listdir(path)) - {name}) if os.path.isdir(path) else []


def _clear_output(command, work):
    _, folder, name = COMMANDS[command]
    path = os.path.join(work, folder, name)
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _fresh_tmpdir(work, label):
    path = os.path.join(work, "tmp", label)
    os.makedirs(path)
    return path


def run(kills, seed=0, commands=("convert", "demo"), pythonpath=REPO, work=None,
        max_delay=None, final_kill=None, log=print):
    """`kills` runs killed after a random delay (commands and signals alternate), then one
    run of each command (SIGTERMed after `final_kill` s if given) to see leftovers removed.

    Delays are uniform in [0.2 s, the fastest uninterrupted run so far], or [0.2 s,
    `max_delay`] (no uninterrupted run first). Returns {"baseline_s", "trials", "final", "work"}.
    """
    work = work or tempfile.mkdtemp(prefix="kill_outputs-")
    os.makedirs(work, exist_ok=True)
    make_inputs(work)
    rng = random.Random(seed)
    baseline, size = {}, None
    for command in commands:
        if max_delay is not None:
            baseline[command] = None
            continue
        code, seconds, _ = run_once(command, work, _fresh_tmpdir(work, f"base-{command}"),
                                    pythonpath)
        if code != 0 or output_state(command, work) != "complete":
            raise SystemExit(f"{command} failed without a kill (exit {code})")
        if command == "convert":
            size = os.path.getsize(os.path.join(work, *COMMANDS[command][1:]))
        baseline[command] = round(seconds, 1)
        log(f"baseline {command}: {seconds:.1f} s")
    fastest = dict(baseline)
    trials = []
    for k in range(kills):
        command = commands[k % len(commands)]
        sig_name = ("SIGTERM", "SIGKILL")[(k // len(commands)) % 2]
        # Within the shortest uninterrupted run seen so far (the machine's load varies).
        delay = rng.uniform(0.2, max_delay or fastest[command])
        _clear_output(command, work)
        before = set(leftovers(command, work))
        tmpdir = _fresh_tmpdir(work, f"kill-{k}")
        code, seconds, sent = run_once(command, work, tmpdir, pythonpath, delay,
                                       SIGNALS[sig_name])
        if not sent and max_delay is None:
            fastest[command] = min(fastest[command], seconds)
        new = sorted(set(leftovers(command, work)) - before)
        trial = {"command": command, "signal": sig_name if sent else None,
                 "delay_s": round(delay, 2), "exit": code,
                 "output": output_state(command, work, size if command == "convert" else None),
                 "left_beside_output": new, "left_in_tmpdir": sorted(os.listdir(tmpdir))}
        trials.append(trial)
        log(f"[{k + 1}/{kills}] {command} {trial['signal'] or 'finished'} at {delay:.1f} s: "
            f"exit {code}, output {trial['output']}, left {len(new)} beside, "
            f"{len(trial['left_in_tmpdir'])} in $TMPDIR")
    final = {}
    for command in commands:
        _clear_output(command, work)
        tmpdir = _fresh_tmpdir(work, f"final-{command}")
        code, _, _ = run_once(command, work, tmpdir, pythonpath, final_kill, signal.SIGTERM)
        final[command] = {"exit": code, "output": output_state(command, work),
                          "left_beside_output": leftovers(command, work),
                          "left_in_tmpdir": sorted(os.listdir(tmpdir))}
        log(f"final {command}: exit {code}, output {final[command]['output']}, left "
            f"{final[command]['left_beside_output']} beside")
    return {"work": work, "baseline_s": baseline, "trials": trials, "final": final}


def summary_rows(result):
    """(label, {command: count}) rows of the table."""
    commands = list(result["baseline_s"])
    trials = result["trials"]

    def count(pred):
        return {c: sum(1 for t in trials if t["command"] == c and pred(t)) for c in commands}

    rows = [("kills (signal sent)", count(lambda t: t["signal"])),
            ("  of which SIGTERM", count(lambda t: t["signal"] == "SIGTERM")),
            ("  of which SIGKILL", count(lambda t: t["signal"] == "SIGKILL")),
            ("finished before the signal", count(lambda t: not t["signal"]))]
    for state in ("complete", "absent", "partial", "partial (empty folder)"):
        rows.append((f"output {state}", count(lambda t, s=state: t["output"] == s)))
    rows += [
        ("runs leaving temp files beside the output, SIGTERM",
         count(lambda t: t["signal"] == "SIGTERM" and t["left_beside_output"])),
        ("runs leaving temp files beside the output, SIGKILL",
         count(lambda t: t["signal"] == "SIGKILL" and t["left_beside_output"])),
        ("runs leaving files in $TMPDIR",
         count(lambda t: t["left_in_tmpdir"])),
        ("left beside the output after a final clean run",
         {c: len(result["final"][c]["left_beside_output"]) for c in commands}),
    ]
    return rows


def render(result, cpu):
    commands = list(result["baseline_s"])
    rows = summary_rows(result)
    width = max(len(label) for label, _ in rows)
    runs = ", ".join(f"{c} {s} s" for c, s in result["baseline_s"].items() if s is not None)
    lines = [f"CPU: {cpu}; uninterrupted run: {runs or 'not measured (--max_delay)'}", "",
        f"{'':<{width}}  " + "  ".join(f"{c:>7}" for c in commands)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{counts[c]:>7}" for c in commands)
              for label, counts in rows]
    return "\n".join(lines)


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default="convert,demo")
    parser.add_argument("--pythonpath", default=REPO, help="tflite_ext checkout the killed "
                        "commands run from (default: this one)")
    parser.add_argument("--work", help="work folder (default: a new one under $TMPDIR, kept)")
    parser.add_argument("--max_delay", type=float, help="kill within this many seconds "
                        "(default: within an uninterrupted run's time, measured first)")
    parser.add_argument("--final_kill", type=float, help="SIGTERM the final runs after this "
                        "many seconds (default: let them finish)")
    parser.add_argument("--json", action="store_true", help="print the trials as JSON")
    args = parser.parse_args()
    result = run(args.kills, args.seed, tuple(args.commands.split(",")), args.pythonpath,
                 args.work, args.max_delay, args.final_kill,
                 log=lambda line: print(line, file=sys.stderr))
    result["cpu"] = _cpu()
    print(json.dumps(result, indent=2) if args.json else render(result, result["cpu"]))


if __name__ == "__main__":
    main()
