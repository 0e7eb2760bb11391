"""The project's own descriptions stay true: environment.yml against pyproject.toml, the README's layout tree and
docs/layout.md against the package, results/ against its index, the docs and each file's record."""
from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
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


def _tracked() -> list[str] | None:
    """Paths git tracks in this checkout, or None outside a git checkout (a tarball)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines() if out.returncode == 0 else None


def _layout_tree() -> list[str]:
    """The folders the README's layout tree names (the first word of each line of its code block)."""
    section = (ROOT / "README.md").read_text().split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip() and line.split()[0].endswith("/")]


def test_readme_layout_tree_is_true():
    """Every folder the README's tree names exists; every package folder and every tracked top-level folder is in it."""
    named = _layout_tree()
    assert named, "the README's layout tree is empty"
    for folder in named:
        assert (ROOT / folder).is_dir(), f"the README's layout names {folder}, which is not a folder"
    packages = [p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "atomkit").rglob("__init__.py")]
    for folder in packages:
        assert folder in named, f"package folder {folder} is missing from the README's layout tree"
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout: the tracked top-level folders are unknown")
    for folder in sorted({path.split("/", 1)[0] + "/" for path in tracked if "/" in path}):
        assert folder in named, f"top-level folder {folder} is missing from the README's layout tree"


def test_layout_md_names_every_module():
    """docs/layout.md names every module of the package (but __init__.py files), and every path it names exists."""
    text = (ROOT / "docs" / "layout.md").read_text()
    named = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert named, "docs/layout.md has no file map"
    for path in named:
        assert (ROOT / path).exists(), f"docs/layout.md names {path}, which does not exist"
    for module in sorted((ROOT / "atomkit").rglob("*.py")):
        rel = module.relative_to(ROOT).as_posix()
        if module.name != "__init__.py" or rel == "atomkit/__init__.py":
            assert rel in named, f"{rel} is missing from docs/layout.md"


def _results() -> list[str]:
    """Files under results/ (relative to it) that belong to the project: the tracked ones in a git checkout (a run
    of your own there is not part of it until you commit it), else every file."""
    tracked = _tracked()
    if tracked is not None:
        return [p.split("/", 1)[1] for p in tracked if p.startswith("results/") and (ROOT / p).exists()]
    return [p.relative_to(ROOT / "results").as_posix() for p in (ROOT / "results").rglob("*") if p.is_file()]


def test_every_result_is_indexed_cited_and_recorded():
    """Every result file is listed in results/README.md and cited by README.md or a docs/ page (a PNG through the
    JSON of the same name, a file in a folder through its folder), and every result JSON begins with its record."""
    files = [f for f in _results() if f != "README.md"]
    assert files, "results/ is empty"
    index = (ROOT / "results" / "README.md").read_text()
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for name in files:
        top = name.split("/", 1)[0]
        listed = f"`{top}/`" if "/" in name else f"`{name}`"
        assert listed in index, f"results/{name} is not listed in results/README.md"
        cited = f"results/{top}/" if "/" in name else f"results/{name}"
        if name.endswith(".png") and (ROOT / "results" / (name[:-4] + ".json")).exists():
            cited = f"results/{name[:-4]}.json"
        assert cited in docs, f"results/{name} is cited by no page (README.md, docs/*.md): cite {cited}"
    reports = [f for f in files if f.endswith(".json")]  # an export's sidecars too
    assert reports
    for name in reports:
        data = json.loads((ROOT / "results" / name).read_text())
        assert next(iter(data)) == "record", f"results/{name} does not begin with its record"
        record = data["record"]
        for key in ("command", "commit", "date", "machine"):
            assert record.get(key), f"results/{name}: the record has no {key}"
