"""Benchmarks: host (LiteRT), micro (TFLite Micro), android (adb + benchmark_model), reports.

Submodules are imported on use so `import tflite_ext.bench` stays light:
`host`, `micro`, `android`, `benchmark_output` (the benchmark_model parser), `report`,
`variants` (train, measure and describe model variants: what the demo and tools/ share),
`commands` (the CLI commands).

Example:
    >>> from tflite_ext.bench import host, micro
    >>> host.time_model("model.tflite")["median_us"]
    >>> micro.analyze("model.tflite")["arena_bytes"]
"""

_SUBMODULES = ("android", "benchmark_output", "commands", "host", "micro", "report", "variants",
               "zoo")


def __getattr__(name):
    # `tx.bench.host` works as `from tflite_ext.bench import host` does, loading on first use.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"tflite_ext.bench.{name}")
    raise AttributeError(f"module 'tflite_ext.bench' has no attribute {name!r}")
