"""The demo (`pipelines/demo/`) is shipped code: what the demo configs, the README and the docs name
exists, and its pictures are package data (an installed copy, not only a checkout, has them)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "pipelines" / "demo"


def texts() -> dict[Path, str]:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "conf").rglob("*.yaml")]
    return {path: path.read_text() for path in files}


def test_the_demo_pictures_are_package_data_and_the_paths_that_name_them_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setup.get("package-data", {}).get("pipelines.demo", [])
    shipped = {p for pattern in patterns for p in DEMO.glob(pattern)}
    pictures = sorted(p for p in (DEMO / "pictures").iterdir() if p.is_file())
    assert pictures, "the edit demo's pictures are gone"
    assert not [p for p in pictures if p not in shipped], \
        "pyproject.toml [tool.setuptools.package-data] 'pipelines.demo' must list the demo pictures"
    named = {(path.relative_to(ROOT), m) for path, text in texts().items()
             for m in re.findall(r"pipelines/demo/[\w./-]+\.png", text)}
    assert named, "the README's edit demo line names the shipped pictures"
    assert not [n for n in named if not (ROOT / n[1]).is_file()], named


def resolve(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:  # the module exists but fails to import
            raise
        module, _, attribute = name.rpartition(".")
        return getattr(importlib.import_module(module), attribute)


def test_every_dotted_name_the_configs_and_docs_give_for_the_demo_resolves():
    named = {(path.relative_to(ROOT), m) for path, text in texts().items()
             for m in re.findall(r"pipelines\.demo\.\w+(?:\.\w+)?", text)}
    assert any(str(path).startswith("conf") for path, _ in named)
    unresolved = []
    for where, name in sorted(named):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{where}: {name} ({error})")
    assert not unresolved, "\n".join(unresolved)
