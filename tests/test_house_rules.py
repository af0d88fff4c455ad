"""The rules of the house that a linter does not check: the arrows between the layers point one
way, and functions stay short (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def public_exports() -> dict[str, str]:
    """pipelines/__init__.py's _EXPORTS (public name -> the module that defines it), read statically."""
    tree = ast.parse((ROOT / "pipelines" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("pipelines/__init__.py has no _EXPORTS")


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved. Inside
    the library, `from pipelines import X` (or `from .. import X` reaching the package) is resolved
    through _EXPORTS to the module X comes from: the public surface must not hide an arrow."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    in_library = path.relative_to(ROOT).parts[0] == "pipelines"
    exports = public_exports() if in_library else {}
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, module))
            if module == "pipelines" and in_library:  # the public surface, from inside: where each name lives
                found += [(node.lineno, exports.get(alias.name, f"pipelines.{alias.name}")) for alias in node.names]
            elif node.module is None:  # `from . import x`: x may be a module
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_the_public_surface_is_resolved_inside_the_library():
    """A model file importing `from pipelines import fetch` (or `from .. import VramSettings`)
    reaches the downloader (the VRAM code): the rules see the module behind the name. The
    runner's `from pipelines import X` stays what it is, the public surface."""
    model = ROOT / "pipelines" / "models" / "qwen_image_dit.py"
    source = "from pipelines import fetch\nfrom .. import VramSettings\nfrom pipelines import demo\n"
    assert [m for _, m in imported_modules(model, source)] == [
        "pipelines", "pipelines.core.download", "pipelines", "pipelines.core.vram", "pipelines", "pipelines.demo"]
    runner_file = ROOT / "runner" / "build.py"
    assert [m for _, m in imported_modules(runner_file, "from pipelines import fetch\n")] == ["pipelines"]


def test_the_runner_uses_the_library_only_through_its_public_surface():
    offending = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in python_files("runner")
                 for line, module in imported_modules(p)
                 if module.startswith("pipelines.") and not module.startswith("pipelines.demo")]
    assert not offending, "the runner must import `pipelines` (its __init__), not its insides:\n" + "\n".join(offending)


def test_the_library_never_imports_the_runner():
    offending = [f"{p.relative_to(ROOT)}:{line}" for p in python_files("pipelines")
                 for line, module in imported_modules(p) if module == "runner" or module.startswith("runner.")]
    assert not offending, offending


def test_model_files_import_nothing_of_core_and_core_knows_no_family():
    models = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in python_files("pipelines/models")
              for line, module in imported_modules(p) if module.startswith("pipelines.core")]
    assert not models, "model files declare their checkpoint contract without importing core:\n" + "\n".join(models)
    core = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in python_files("pipelines/core")
            for line, module in imported_modules(p)
            if module.startswith(("pipelines.models", "pipelines.qwen_image", "pipelines.demo"))]
    assert not core, "core/ must not know a model or a family:\n" + "\n".join(core)


def test_vram_and_lora_do_not_reach_into_each_other():
    pairs = (("pipelines/core/vram", "pipelines.core.lora"), ("pipelines/core/lora", "pipelines.core.vram"))
    offending = [f"{p.relative_to(ROOT)}:{line} imports {module}" for folder, other in pairs
                 for p in python_files(folder) for line, module in imported_modules(p) if module.startswith(other)]
    assert not offending, "they meet through pipelines.core.weight_access:\n" + "\n".join(offending)


@pytest.mark.parametrize("folder", ["pipelines/core", "runner"])
def test_functions_stay_short(folder):
    long = []
    for path in python_files(folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_a_test_that_needs_what_the_machine_lacks_skips_but_fails_under_ci(tmp_path):
    """`@pytest.mark.needs(...)` (tests/conftest.py): skipped where the requirement is missing,
    failed with CI=true, where CI is meant to have installed it."""
    import os
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import REQUIREMENTS, pytest_configure, pytest_runtest_setup  # noqa: F401\n"
        "REQUIREMENTS['absent'] = (lambda: False, 'a thing this machine lacks')\n")
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n\n@pytest.mark.needs('absent')\ndef test_it():\n    pass\n")
    outcomes = {}
    for ci in ("", "true"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), CI=ci)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        outcomes[ci] = (proc.returncode, proc.stdout)
    assert outcomes[""][0] == 0 and "1 skipped" in outcomes[""][1], outcomes[""][1]
    assert "needs a thing this machine lacks" in outcomes[""][1]
    assert outcomes["true"][0] == 1 and "1 error" in outcomes["true"][1], outcomes["true"][1]  # fails in its setup
    assert "CI=true, but this test needs a thing this machine lacks" in outcomes["true"][1]
