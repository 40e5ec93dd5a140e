"""docker/Dockerfile against the tree: it parses the files only (no image is built here).

The image build itself is a program, docker/build.sh, not part of the suite.
"""
import fnmatch
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(text):
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def _stages():
    """Global ARGs and the stages in order: {name, base, steps}."""
    global_args, stages = {}, []
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append({"name": m.group(2), "base": m.group(1), "steps": []})
        elif not stages:
            assert word == "ARG", f"only ARG may come before the first FROM, got {word}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1]["steps"].append((word, rest))
    return global_args, stages


def _chain(target):
    """The steps of a target and of every stage it is built FROM, base first."""
    _, stages = _stages()
    by_name = {s["name"]: s for s in stages}
    chain, stage = [], by_name[target]
    while stage is not None:
        chain.insert(0, stage)
        stage = by_name.get(stage["base"])
    return [step for s in chain for step in s["steps"]]


def _runs(target):
    return [rest for word, rest in _chain(target) if word == "RUN"]


def _readme_install():
    """The pip install of README.md's test command, e.g. `pip install -q -e ".[test]"`."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    installs = [c.strip() for c in test_command.split("&&") if c.strip().startswith("pip install")]
    assert len(installs) == 1, test_command
    return installs[0]


def _dockerignore():
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    return [p.strip().rstrip("/") for p in path.read_text().splitlines()
            if p.strip() and not p.startswith("#")]


def test_the_base_is_an_arg_whose_default_is_a_registry_image():
    global_args, stages = _stages()
    default = global_args["BASE"]
    registry, _, rest = default.partition("/")
    assert "." in registry and registry != "localhost", default   # a registry host, named
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", rest), default        # and a tag
    assert stages[0]["base"] in ("${BASE}", "$BASE")
    assert all(s["base"] in ("${BASE}", "$BASE") or s["base"] in {t["name"] for t in stages}
               for s in stages), "every stage comes from BASE or from another stage"


def test_build_script_pulls_the_dockerfiles_default_base():
    global_args, _ = _stages()
    script = (ROOT / "docker" / "build.sh").read_text()
    m = re.search(r'BASE_IMAGE="\$\{BASE_IMAGE:-([^}]+)\}"', script)
    assert m and m.group(1) == global_args["BASE"]


def test_every_copy_source_exists_in_the_tree_and_is_not_ignored():
    ignored = _dockerignore()
    _, stages = _stages()
    checked = 0
    for stage in stages:
        for word, rest in stage["steps"]:
            if word not in ("COPY", "ADD"):
                continue
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            sources = [a for a in args if not a.startswith("--")][:-1]
            assert sources, rest
            for source in sources:
                hits = list(ROOT.glob(source)) if source != "." else [ROOT]
                assert hits, f"COPY {source}: no such file in the tree"
                for pattern in ignored:
                    assert not fnmatch.fnmatch(source, pattern), f"{source} is in .dockerignore"
                checked += 1
    assert checked >= 4


def test_full_image_installs_the_package_exactly_as_readme_does():
    install = _readme_install()
    assert install in _runs("full")
    # and it is the default target: the last stage
    assert _stages()[1][-1]["name"] == "full"


def test_full_image_copies_the_whole_tree_for_the_tests():
    copies = [shlex.split(rest) for word, rest in _chain("full") if word == "COPY"]
    assert [".", "/src"] in copies


@pytest.mark.parametrize("target", ["full", "slim-build"])
def test_adb_and_vela_are_installed(target):
    runs = " ".join(_runs(target))
    assert re.search(r"apt-get install [^&]*\badb\b", runs)
    # vela: installed by its own line, or by the package once setup.py requires it
    assert (re.search(r"pip install [^&]*\bethos-u-vela\b", runs)
            or any(r.startswith("ethos-u-vela") for r in _requirements().requirements()))


def test_slim_image_has_no_test_extras_and_no_tfmot():
    runs = " ".join(_runs("slim-build"))
    assert "[test]" not in runs and "[compare]" not in runs
    assert "tensorflow-model-optimization" not in runs and "tf-keras" not in runs
    assert "--no-deps -e ." in runs and "requirements.py --tensorflow-cpu" in runs
    slim = _stages()[1]
    slim = next(s for s in slim if s["name"] == "slim")
    assert [w for w, _ in slim["steps"]].count("RUN") == 0, "slim only copies the built venv"


def _requirements():
    """docker/requirements.py as a module."""
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import requirements
    finally:
        sys.path.pop(0)
    return requirements


def test_requirements_script_gives_setup_pys_runtime_requirements():
    requirements = _requirements()
    plain = requirements.requirements()
    cpu = requirements.requirements(tensorflow_cpu=True)
    assert len(plain) == len(cpu) and plain
    tf = [r for r in plain if re.match(r"tensorflow\b(?!-)", r)]
    assert len(tf) == 1
    assert tf[0].replace("tensorflow", "tensorflow-cpu", 1) in cpu
    assert not any(re.match(r"tensorflow[=<>~ ]", r) for r in cpu)
    assert not any("model-optimization" in r or "pytest" in r for r in cpu)


def test_build_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "docker" / "build.sh")], check=True)


def test_docker_readme_shows_android_with_usb_passthrough_and_mounted_models():
    text = (ROOT / "docker" / "README.md").read_text()
    assert "tflite-ext android" in text
    assert "/dev/bus/usb" in text
    assert re.search(r"-v \S+:/models", text)
