"""Where a model must fit, each measured by the real tool: one interface, `Target.measure`.

- `host[:THREADS]`: LiteRT with XNNPACK on this machine (one thread is timed in its CPU time,
  free of other processes' load; more threads by the wall clock);
- `reference`: LiteRT's reference kernels (plain loops: cost follows MACs, as on a
  microcontroller);
- `micro`: TensorFlow Lite Micro: exact arena, flash (the flatbuffer as deployed: without
  tensor names, `tflite_ext.names`), TFLM host time;
- `ethos-u55-128` (and every configuration `vela` knows): Arm's Vela compiler's estimate:
  time, SRAM (the arena), flash, ops left on the CPU;
- `android[:SERIAL]`: `benchmark_model` over `adb` (needs `binary=`).

`measure({name: flatbuffer})` returns {name: {metric: value}} with the `Budget` metrics it
can measure (`latency_us`, `flash_bytes`, `arena_bytes`; `macs` is added by the search).
Host-side timings of several candidates are taken interleaved, so they compare.

Example:
    >>> target = get_target("ethos-u55-128")
    >>> target.measure({"small": flatbuffer})["small"]["latency_us"]
    161.2
"""
import csv
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time

from tflite_ext.errors import InputError, RunTimeout

VELA_CONFIGS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256",
                "ethos-u65-256", "ethos-u65-512", "ethos-u85-128", "ethos-u85-256",
                "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")


# Between repeated timings of the same files: the 2-core AMD EPYC VM's timings flip between two
# regimes that last seconds (`Target.measure_least`, `compress.api.measure_beside`).
RETIME_PAUSE_S = 1.0


class Target:
    """A device or runtime that measures int8 flatbuffers."""

    name = "target"
    metrics = ()          # the Budget metrics it measures
    lut = False           # runs TFLM's TFLM_DECODE (LUT-compressed weights)
    timed = True          # its latency is a timing (noisy), not an estimate

    @property
    def key(self):
        """What its measurements depend on (cache key): the name and, on the host, the CPU."""
        return self.name

    def deploy(self, flatbuffer):
        """The file this target runs, made from a converted one (`measure` measures it)."""
        return flatbuffer

    def measure(self, flatbuffers):
        raise NotImplementedError

    def measure_least(self, flatbuffers, times=3, pause=RETIME_PAUSE_S):
        """`measure`; on a `timed` target `times` times, `pause` s apart, each file's least
        latency kept. The one-change candidates and the base every prediction scales from are
        measured this way: on a 2-core AMD EPYC VM the unpruned ResNet-8 measured 84.7 µs in one
        search and 108.1 in the next (the VM's timings flip between regimes for seconds), and
        a budget of "0.4x" followed it."""
        out = self.measure(flatbuffers)
        for _ in range(times - 1 if self.timed else 0):
            time.sleep(pause)
            for n, cost in self.measure(flatbuffers).items():
                got = [t for t in (out[n].get("latency_us"), cost.get("latency_us"))
                       if isinstance(t, (int, float))]
                if got:
                    out[n]["latency_us"] = min(got)
        return out


class Host(Target):
    metrics = ("latency_us", "flash_bytes")

    def __init__(self, threads=1, reference=False, runs=200):
        self.threads, self.reference, self.runs = threads, reference, runs
        self.name = "reference" if reference else f"host:{threads}"

    @property
    def key(self):
        from tflite_ext.bench.host import describe_cpu

        # "reference2": timed after 10 warm-up runs, not 2 (`measure`)
        name = "reference2" if self.reference else self.name
        return f"{name}:{describe_cpu()}"

    def measure(self, flatbuffers):
        from tflite_ext.bench import host

        # Reference kernels are ~40x slower: fewer rounds, but the same 10 warm-up runs. With
        # 2 warm-ups and 10 rounds, six medians of one ResNet-8 file beside its base spread
        # 4.9% and read 3% high (an AMD EPYC): a plan 1% under its budget in one shot then
        # "missed" it after the fine-tune, which changes no shape. With 10 and 20-50: 1.4-1.5%.
        runs = max(self.runs // 5, 5) if self.reference else self.runs
        # One thread is timed in its CPU time: on a shared machine the scheduler takes slices
        # of a run (measured here under load: 11.3 ms wall, 3.4 ms CPU for one ResNet-8
        # reference-kernel run), and a search must not chase the neighbours' load.
        medians = host.time_interleaved(flatbuffers, runs=runs, warmup=10,
                                        num_threads=self.threads, reference=self.reference,
                                        cpu_time=self.threads == 1)
        return {n: {"latency_us": medians[n], "flash_bytes": len(fb)}
                for n, fb in flatbuffers.items()}


class Micro(Target):
    name = "micro"
    metrics = ("latency_us", "flash_bytes", "arena_bytes")
    lut = True  # TFLM runs TFLM_DECODE: clustered weights can ship LUT-compressed

    def __init__(self, strip_names=True):
        self.strip_names = strip_names

    @property
    def key(self):
        # "2": the converter's metadata stripped too, LUT indices without quantization
        return "micro:stripped2" if self.strip_names else "micro2"

    def deploy(self, flatbuffer):
        """TFLM never reads tensor names, signatures or the converter's metadata: on a small
        model they are a fifth of the flash (2,456 of the digits CNN's 13,120 bytes), so by
        default they go."""
        from tflite_ext import names

        return names.strip(flatbuffer) if self.strip_names else flatbuffer

    def measure(self, flatbuffers):
        from tflite_ext.bench import micro

        out = {}
        for n, fb in flatbuffers.items():
            fb = self.deploy(fb)
            info = micro.check_model(fb)
            arena = micro.minimum_arena(fb, len(info["inputs"]))
            out[n] = {"latency_us": micro.latency(fb, arena, runs=10)["median_us"],
                      "flash_bytes": len(fb), "arena_bytes": arena}
        return out


def _vela_program():
    found = shutil.which("vela")
    if found is None:
        raise InputError("The ethos-u targets need Arm's vela compiler: pip install "
                         "ethos-u-vela (it is a dependency of tflite_ext; reinstall with "
                         "pip install -e .)")
    return found


class EthosU(Target):
    metrics = ("latency_us", "flash_bytes", "arena_bytes")
    timed = False  # vela's estimate: the same file, the same figure

    def __init__(self, config="ethos-u55-128"):
        if config not in VELA_CONFIGS:
            raise InputError(f"Unknown Ethos-U configuration {config!r}; vela knows: "
                             f"{', '.join(VELA_CONFIGS)}")
        self.name = self.config = config
        self.program = _vela_program()

    def measure(self, flatbuffers):
        return {n: self.estimate(fb) for n, fb in flatbuffers.items()}

    def estimate(self, flatbuffer):
        """Vela's summary for one model: latency, SRAM (arena), flash, NPU and CPU ops."""
        with tempfile.TemporaryDirectory(prefix="tflite_ext-vela-") as work:
            path = os.path.join(work, "model.tflite")
            with open(path, "wb") as f:
                f.write(flatbuffer)
            try:
                run = subprocess.run([self.program, path, "--accelerator-config", self.config,
                                      "--output-dir", os.path.join(work, "out")],
                                     capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise RunTimeout(f"vela did not finish compiling the model for {self.config} "
                                 f"in 600 s. Received: a {len(flatbuffer):,}-byte model") from None
            summaries = glob.glob(os.path.join(work, "out", "*_summary_*.csv"))
            if run.returncode != 0 or not summaries:
                last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
                raise InputError(f"vela could not compile the model for {self.config}: "
                                 f"{last[0]}")
            with open(summaries[0], newline="") as f:
                row = next(csv.DictReader(f))
        ops = dict(re.findall(r"(CPU|NPU) operators = (\d+)", run.stdout))
        kib = 1024
        return {"latency_us": float(row["inference_time"]) * 1e6,
                "arena_bytes": int(float(row["sram_memory_used"]) * kib),
                "flash_bytes": int((float(row["off_chip_flash_memory_used"])
                                    + float(row["on_chip_flash_memory_used"])) * kib),
                "cycles": int(float(row["cycles_total"])),
                "cpu_ops": int(ops.get("CPU", 0)), "npu_ops": int(ops.get("NPU", 0))}


class Android(Target):
    metrics = ("latency_us", "flash_bytes")

    def __init__(self, serial=None, binary=None, threads=1):
        from tflite_ext.bench import android

        if binary is None:
            raise InputError("The android target needs benchmark_model for the phone's ABI: "
                             "pass binary=PATH (--binary on the command line)")
        adb = android.Adb()
        devices = android.select_devices(adb, serial)  # one-line DeviceError if none
        self.serial, self.binary, self.threads = devices[0], binary, threads
        self.name = f"android:{self.serial}"

    def measure(self, flatbuffers):
        from tflite_ext.bench import android

        out = {}
        for n, fb in flatbuffers.items():
            with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
                f.write(fb)
                f.flush()
                result = android.run_benchmark(f.name, self.binary, serial=self.serial,
                                               threads=self.threads)[0]
            out[n] = {"latency_us": float(result["timings_us"]["inference_avg"]),
                      "flash_bytes": len(fb)}
        return out


def get_target(spec, binary=None):
    """A Target from its name: host[:THREADS], reference, micro, ethos-u55-128..., android[:SERIAL].

    Raises:
        InputError: an unknown name, `vela` missing, no Android device or binary.
    """
    name, _, arg = str(spec).partition(":")
    if name == "host":
        if arg and not arg.isdigit() or arg == "0":
            raise InputError(f"host takes a thread count, e.g. host:2. Received: target={spec!r}")
        return Host(int(arg or 1))
    if name == "reference" and not arg:
        return Host(reference=True)
    if name == "micro" and not arg:
        return Micro()
    if name.startswith("ethos-u") and not arg:
        return EthosU(name)
    if name == "android":
        return Android(arg or None, binary)
    raise InputError(f"Unknown target {spec!r}; expected host[:THREADS], reference, micro, "
                     f"android[:SERIAL] or one of {', '.join(VELA_CONFIGS)}")
