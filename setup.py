"""tflite_ext: structured pruning, QAT and verified full-integer TFLite conversion for Keras 3."""
from setuptools import find_packages, setup

COMPARE = ["tensorflow-model-optimization==0.8.1", "tf-keras==2.21.*"]

setup(
    name="tflite_ext",
    version="0.1.0",
    description=(
        "Keras 3 callbacks for structured pruning, quantization-aware training and distillation; "
        "verified full-integer TFLite conversion; host, TFLite Micro and Android benchmarks."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tflite_ext", "tflite_ext.*"]),
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.13,<4",
        "ai-edge-litert>=2.3",
        "tflite-micro",
        "numpy",
        "absl-py",
        "flatbuffers",
        "scikit-learn",
        "matplotlib",
        "ethos-u-vela",  # Arm's Ethos-U compiler: the ethos-u targets of compress
    ],
    extras_require={
        # The peer we compare against; only tools/tfmot_peer.py imports it, in its own process.
        "compare": COMPARE,
        # The suite runs tools/compare.py in quick mode, tfmot side included.
        # ruff: the lint rules of ruff.toml, which CI runs before the tests.
        "test": ["pytest>=8", "pytest-xdist", "ruff>=0.6", *COMPARE],
    },
    entry_points={"console_scripts": ["tflite-ext=tflite_ext.cli:run"]},
)
