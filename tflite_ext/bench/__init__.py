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
