"""environment.yml (for conda users) must not drift from pyproject.toml."""
from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(r for r in pip if r != "-e .") == sorted(project["dependencies"])
    assert "-e ." in pip
    python = next(d for d in conda if d.startswith("python"))
    assert python.split("=")[1] == project["requires-python"].split(",")[0].lstrip(">=")
    assert "ffmpeg" in conda and any(d.startswith("openjdk") for d in conda)


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_readme_file_map_is_true():
    """Every path the README's file map names exists, and every package module is in the map."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Files", 1)[1].split("\n## ", 1)[0]
    named = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert named, "README file map is empty"
    for path in named:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for module in (ROOT / "atomkit").rglob("*.py"):
        rel = module.relative_to(ROOT).as_posix()
        assert rel in named or module.name == "__init__.py" and rel != "atomkit/__init__.py", \
            f"{rel} is missing from the README file map"
