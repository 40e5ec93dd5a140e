"""README promises: CI runs the README's test command verbatim, and the demo command is shown."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_shows_the_demo_command():
    assert any("tflite-ext demo" in b for b in _bash_blocks())


def test_version_is_written_only_in_setup_py():
    assert re.search(r'version="\d+\.\d+\.\d+"', (ROOT / "setup.py").read_text())
    hits = [p for p in (ROOT / "tflite_ext").rglob("*.py")
            if re.search(r'__version__\s*=\s*"\d+\.\d+', p.read_text())]
    assert hits == []
