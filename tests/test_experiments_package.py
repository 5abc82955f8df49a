"""The experiments live beside the library, not in it: the wheel holds wnorm alone, importing
wnorm imports torch and nothing else, and every experiment script says its own command and
refuses a bad option with an argparse error."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["demo", "classify", "classify_gpu", "lr_sweep", "vae", "seq", "dqn", "report",
           "graph"]


def test_the_wheel_holds_the_library_alone(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("wnorm", "experiments", "bench", "tools", "tests"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("wnorm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"wnorm", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert "wnorm/__init__.py" in names and not any("repro" in n for n in names)


def test_importing_wnorm_imports_torch_and_nothing_else() -> None:
    """Beyond what ``import torch`` loads: wnorm's own modules and the standard library."""
    code = ("import sys, torch; before = set(sys.modules); import wnorm; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'wnorm'}; "
            "print(sorted(new - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_names_its_command_and_has_help(name: str, capsys) -> None:
    mod = importlib.import_module(f"experiments.{name}")
    assert f"python -m experiments.{name}" in mod.__doc__
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert f"python -m experiments.{name}" in capsys.readouterr().out  # the usage line
