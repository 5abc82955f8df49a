"""The README: its generated sections match the files they come from, and its quickstart runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_sections_match_their_source_files():
    done = subprocess.run([sys.executable, "tools/readme.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_image_the_readme_shows_exists():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (ROOT / target).is_file(), target


def test_quickstart_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quickstart", "exec"), {})


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_test_the_docs_cite_exists():
    """docs/guarantees.md names the test behind each guarantee: a renamed test must not leave
    a guarantee pointing at nothing."""
    import ast

    cited = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        cited |= set(re.findall(r"(test_\w+\.py)::(\w+)", doc.read_text()))
    assert cited
    for file, name in sorted(cited):
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"{file}::{name}"
