"""Feeds mutated and truncated .tflite files to inspect, bench host and micro; counts outcomes.

Every outcome must be a success or one of the project's errors (`tflite_ext.errors`): a foreign
exception type or a native crash (the process dies on a signal) is a bug. Each path runs in
worker processes, so a crash costs one case, not the run; the case that was running is named.

    python tools/fuzz_flatbuffers.py --cases 10000 --paths inspect,host,micro=1000
    python tools/fuzz_flatbuffers.py --replay host:1234     # rerun one case, with its traceback

`--cases` is per path (`micro=N` overrides it: each micro case that passes the checks starts
two TFLM child processes). Seeds are four small int8 models converted with the real converter
(cached in --seeds-dir). Exit status 1 if any foreign exception or native crash was seen.
"""
import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ("dense_int8", "conv_int8", "conv_uint8io", "dense_lut")
PATHS = ("inspect", "host", "micro", "convert")
_MARK = "@@fuzz "  # worker result lines; native libraries may print to stdout too
# Values an overwritten byte or 32-bit field takes: the ones that break offset arithmetic.
_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
_INT32 = (0, 1, 2, 3, 4, -1, -2, 0x7FFFFFFF, -0x80000000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
          16777196, 1 << 24)


# --- seed models -------------------------------------------------------------------------

def _seed_keras(name):
    import keras

    keras.utils.set_random_seed(0)
    if name.startswith("dense"):
        # The LUT seed needs weights enough that indices + tables save more than the
        # compression metadata costs.
        lut = name == "dense_lut"
        inputs = keras.Input((32 if lut else 16,))
        x = keras.layers.Dense(128 if lut else 12, activation="relu")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4)(x))
        if name == "dense_lut":  # few distinct weights per tensor: LUT-compressible
            for layer in model.layers[1:]:
                w, b = layer.get_weights()
                layer.set_weights([np.sign(w) * 0.25, b])  # 2 values: 1-bit indices
        return model
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def build_seed(name):
    """The flatbuffer bytes of one seed model, converted with the real converter."""
    from tflite_ext import convert

    model = _seed_keras(name)
    shape = (64, *model.inputs[0].shape[1:])  # calibration samples
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    if name == "dense_lut":
        result = convert.to_tflite(model, x, lut=True, lut_data=x[:8])
        return result.lut.flatbuffer
    return convert.to_tflite(model, x, io_dtype="uint8" if "uint8" in name else None).flatbuffer


def seed_keras_file(folder):
    """A small `.keras` file (for the convert path) and its calibration samples."""
    path = os.path.join(folder, "dense.keras")
    if not os.path.exists(path):
        _seed_keras("dense_int8").save(path)
    return path, np.random.default_rng(0).random((16, 16), dtype=np.float32)


def load_seeds(folder):
    """{name: bytes} of the seed models, converted once and cached in `folder`."""
    os.makedirs(folder, exist_ok=True)
    seeds = {}
    for name in SEEDS:
        path = os.path.join(folder, f"{name}.tflite")
        if not os.path.exists(path):
            data = build_seed(name)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        with open(path, "rb") as f:
            seeds[name] = f.read()
    return seeds


# --- mutations ---------------------------------------------------------------------------

def mutate(data, rng):
    """(mutated bytes, description): 1-3 stacked bit flips, boundary bytes, 32-bit field
    overwrites at 4-aligned offsets, or one truncation."""
    out = bytearray(data)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["flip", "byte", "int32", "int32", "truncate"])
        if kind == "truncate":
            cut = int(rng.integers(0, len(out))) if rng.random() < 0.8 \
                else int(rng.integers(0, 64))
            del out[cut:]
            done.append(f"truncate@{cut}")
            break
        if len(out) < 8:
            break
        if kind == "flip":
            at = int(rng.integers(0, len(out)))
            bit = int(rng.integers(0, 8))
            out[at] ^= 1 << bit
            done.append(f"flip@{at}.{bit}")
        elif kind == "byte":
            at = int(rng.integers(0, len(out)))
            out[at] = int(rng.choice(_BYTES))
            done.append(f"byte@{at}={out[at]:#x}")
        else:
            at = int(rng.integers(0, len(out) // 4)) * 4
            value = int(rng.choice(_INT32)) if rng.random() < 0.7 else \
                int(rng.integers(-2**31, 2**31))
            if rng.random() < 0.2:
                value = len(data) + int(rng.integers(-8, 9))
            out[at:at + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
            done.append(f"int32@{at}={value}")
    return bytes(out), " ".join(done)


def case_input(seeds, seed, case):
    """(seed model name, mutated bytes, mutation) of one case: the same on every run."""
    rng = np.random.default_rng([seed, case])
    name = SEEDS[int(rng.integers(0, len(SEEDS)))]
    data, how = mutate(seeds[name], rng)
    return name, data, how


# --- the paths ---------------------------------------------------------------------------

def run_inspect(data):
    from tflite_ext import inspect

    inspect.render(inspect.summary(data))


def run_host(data):
    from tflite_ext.bench import host

    host.describe(data)
    host.time_model(data, runs=2, warmup=1)


def run_micro(data):
    """What `micro.analyze` does, with one generous arena instead of the bisection."""
    from tflite_ext.bench import micro

    info = micro.check_model(data)
    arena = max(16 * 1024 * 1024, 10 * len(data))
    micro.allocation_report(data, len(info["inputs"]))
    micro.latency(data, arena, runs=1, warmup=0)
    if not info["compressed"]:  # LiteRT has no TFLM_DECODE kernel
        micro.agreement(data, arena_size=arena, samples=2)


def run_convert(data, folder):
    """Mutated bytes of a `.keras` file through the public convert entry."""
    from tflite_ext import convert

    path = os.path.join(folder, "mutated.keras")
    with open(path, "wb") as f:
        f.write(data)
    _, x = seed_keras_file(folder)
    convert.to_tflite(path, x)


def classify(error):
    """"ok", the project error's class name, or "foreign:<type>"."""
    from tflite_ext.errors import TfliteExtError

    if error is None:
        return "ok"
    name = type(error).__name__
    return name if isinstance(error, TfliteExtError) else f"foreign:{name}"


def _path_seeds(path, seeds_dir):
    """The bytes a path's cases mutate: the .tflite seeds, or the .keras file for convert."""
    if path != "convert":
        return load_seeds(seeds_dir)
    keras_path, _ = seed_keras_file(seeds_dir)
    with open(keras_path, "rb") as f:
        data = f.read()
    return {name: data for name in SEEDS}


def _runner(path, tmp):
    if path == "convert":
        return lambda data: run_convert(data, tmp)
    return {"inspect": run_inspect, "host": run_host, "micro": run_micro}[path]


def _worker(job):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    seeds = _path_seeds(job["path"], job["seeds_dir"])
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        run = _runner(job["path"], tmp)
        for case in range(job["start"], job["stop"]):
            name, data, how = case_input(seeds, job["seed"], case)
            print(_MARK + json.dumps({"start": case}), flush=True)
            try:
                run(data)
                error = None
            except Exception as e:  # the point: record whatever escapes
                error = e
            outcome = classify(error)
            line = str(error).splitlines()[0][:300] if error is not None and str(error) else ""
            print(_MARK + json.dumps({"case": case, "outcome": outcome, "seed_model": name,
                                      "mutation": how, "message": line}), flush=True)


# --- the driver --------------------------------------------------------------------------

def run_path(path, cases, seed, seeds_dir, batch=250, timeout=900):
    """Runs `cases` cases of one path in worker processes; returns the list of results.

    A worker that dies mid-case records that case as a native crash (its exit status or
    signal) and the next worker resumes after it."""
    seeds = _path_seeds(path, seeds_dir)
    results, start = [], 0
    while start < cases:
        stop = min(cases, start + batch)
        job = json.dumps({"path": path, "seed": seed, "start": start, "stop": stop,
                          "seeds_dir": seeds_dir})
        argv = [sys.executable, os.path.abspath(__file__), "--worker", job]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            out, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code = "timeout"
        lines = [json.loads(ln[len(_MARK):]) for ln in out.splitlines() if ln.startswith(_MARK)]
        done = [r for r in lines if "case" in r]
        results += done
        started = [r["start"] for r in lines if "start" in r]
        last = done[-1]["case"] if done else start - 1
        if started and started[-1] > last:   # died inside this case
            crashed = started[-1]
            kind = "hang" if code == "timeout" else (
                f"signal {-code}" if isinstance(code, int) and code < 0 else f"exit {code}")
            name, _, how = case_input(seeds, seed, crashed)
            results.append({"case": crashed, "outcome": f"native:{kind}", "seed_model": name,
                            "mutation": how, "message": kind})
            start = crashed + 1
        elif code not in (0,) and last < stop - 1:
            raise SystemExit(f"worker failed before any case (exit {code}): "
                             f"{proc.stderr[-2000:] if code != 'timeout' else ''}")
        else:
            start = stop
    return results


def _bad(outcome):
    return outcome.startswith(("foreign:", "native:"))


def table(counts, elapsed):
    """The outcome counts, one row per path and one column per outcome."""
    kinds = sorted({k for c in counts.values() for k in c},
                   key=lambda k: (k != "ok", _bad(k), k))
    header = ["path", "cases", *kinds]
    rows = [[path, str(sum(c.values())), *[str(c.get(k, 0)) for k in kinds]]
            for path, c in counts.items()]
    total = ["total", str(sum(int(r[1]) for r in rows)),
             *[str(sum(c.get(k, 0) for c in counts.values())) for k in kinds]]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, total)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*r) for r in rows + [total]]
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parse_paths(text, cases):
    plan = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if name not in PATHS:
            raise SystemExit(f"unknown path {name!r}; expected some of {', '.join(PATHS)}")
        plan[name] = int(count) if count else cases
    return plan


def replay(spec, seed, seeds_dir):
    """Runs one case in this process and prints its traceback (a native crash kills it)."""
    import traceback

    path, _, case = spec.partition(":")
    name, data, how = case_input(_path_seeds(path, seeds_dir), seed, int(case))
    print(f"{path} case {case}: {name} {how}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        try:
            _runner(path, tmp)(data)
            print("ok")
        except Exception as e:
            traceback.print_exc()
            print(classify(e))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="cases per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="inspect,host,micro=1000",
                        help=f"comma-separated, of {', '.join(PATHS)}; name=N sets its cases")
    parser.add_argument("--seeds-dir", default=os.path.join(REPO, "build", "fuzz_seeds"))
    parser.add_argument("--batch", type=int, default=250, help="cases per worker process")
    parser.add_argument("--examples", type=int, default=3,
                        help="cases shown per foreign or native outcome")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replay", metavar="PATH:CASE", help="rerun one case, with traceback")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    seeds_dir = os.path.abspath(args.seeds_dir)
    if args.replay:
        return replay(args.replay, args.seed, seeds_dir)
    plan = _parse_paths(args.paths, args.cases)
    for path in plan:  # convert once here, not in every worker
        _path_seeds(path, seeds_dir)
    started = time.perf_counter()
    counts, bad = {}, []
    for path, cases in plan.items():
        t0 = time.perf_counter()
        results = run_path(path, cases, args.seed, seeds_dir, args.batch)
        counts[path] = dict(collections.Counter(r["outcome"] for r in results))
        bad += [(path, r) for r in results if _bad(r["outcome"])]
        print(f"{path}: {cases} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\nseed {args.seed}, CPU: {cpu_name()} ({os.cpu_count()} cores), "
          f"{elapsed:.0f} s in all")
    print(table(counts, elapsed))
    shown = collections.Counter()
    for path, r in bad:
        key = (path, r["outcome"])
        shown[key] += 1
        if shown[key] <= args.examples:
            print(f"  {path} case {r['case']} {r['outcome']}: {r.get('seed_model', '')} "
                  f"{r.get('mutation', '')}: {r['message']}  "
                  f"(replay: --replay {path}:{r['case']} --seed {args.seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
