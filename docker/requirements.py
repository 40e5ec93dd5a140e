"""Print setup.py's install_requires, one a line (the slim image installs from it).

    python docker/requirements.py                    # as setup.py writes them
    python docker/requirements.py --tensorflow-cpu   # tensorflow==X -> tensorflow-cpu==X
    python docker/requirements.py --extra test       # plus an extra's requirements

Run from the repository root (setup.py reads README.md). setup.py is executed with
setuptools.setup replaced, so nothing is built or installed.
"""
import argparse
import os
import pathlib
import re
import runpy
import sys

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_kwargs(root=ROOT):
    """The keyword arguments setup.py passes to setuptools.setup."""
    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        cwd = pathlib.Path.cwd()
        os.chdir(root)
        try:
            runpy.run_path(str(root / "setup.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
    finally:
        setuptools.setup = real
    return captured


def requirements(tensorflow_cpu=False, extras=(), root=ROOT):
    kwargs = setup_kwargs(root)
    reqs = list(kwargs.get("install_requires", []))
    for extra in extras:
        reqs += kwargs.get("extras_require", {})[extra]
    if tensorflow_cpu:
        reqs = [re.sub(r"^tensorflow(?=\s*(==|>=|<=|~=|<|>|$|\[|;))", "tensorflow-cpu", r)
                for r in reqs]
    return reqs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensorflow-cpu", action="store_true")
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.tensorflow_cpu, args.extra)))


if __name__ == "__main__":
    sys.exit(main())
