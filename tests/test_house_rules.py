"""The rules of the house that a linter does not check (docs/architecture.md): the arrows between
the layers and the rooms point one way, no import circle, no private name borrowed across files,
files and functions stay short, no test code in the shipped packages."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60  # pipelines/core and runner/
MAX_ANY_FUNCTION_LINES = 80  # everywhere in pipelines/ and runner/
MAX_FILE_LINES = 600
PACKAGES = ("pipelines", "runner")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    """runner/build/pipeline.py -> runner.build.pipeline; runner/build/__init__.py -> runner.build."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in python_files(*PACKAGES, "hydra_plugins")}


def public_exports() -> dict[str, str]:
    """pipelines/__init__.py's _EXPORTS (public name -> the module that defines it), read statically."""
    tree = ast.parse((ROOT / "pipelines" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("pipelines/__init__.py has no _EXPORTS")


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST, with_type_checking: bool = True) -> list[ast.AST]:
    """Every import statement, those inside functions included; `if TYPE_CHECKING:` blocks
    (imports for type checkers only, never run) left out unless `with_type_checking`."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if not with_type_checking and _is_type_checking(node):
            children = list(node.orelse)
        todo.extend(children)
    return sorted(found, key=lambda n: n.lineno)


def from_module(package: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from <module> import ...` in a file of `package`."""
    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(path: Path, source: str | None = None, with_type_checking: bool = True) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved, and
    `from package import module` as that module. Inside the library, `from pipelines import X` (or
    `from .. import X` reaching the package) is resolved through _EXPORTS to the module X comes
    from: the public surface must not hide an arrow."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    in_library = path.relative_to(ROOT).parts[0] == "pipelines"
    exports = public_exports() if in_library else {}
    found = []
    tree = ast.parse(path.read_text() if source is None else source)
    for node in import_nodes(tree, with_type_checking):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
            continue
        module = from_module(package, node)
        found.append((node.lineno, module))
        if module == "pipelines" and in_library:  # the public surface, from inside: where each name lives
            found += [(node.lineno, exports.get(alias.name, f"pipelines.{alias.name}")) for alias in node.names]
        else:  # `from . import x`, `from .build import pipeline`: x may be a module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if node.module is None or f"{module}.{alias.name}" in MODULES]
    return found


def test_the_public_surface_is_resolved_inside_the_library():
    """A model file importing `from pipelines import fetch` (or `from .. import VramSettings`)
    reaches the downloader (the VRAM code): the rules see the module behind the name. The
    runner's `from pipelines import X` stays what it is, the public surface."""
    model = ROOT / "pipelines" / "models" / "qwen_image_dit.py"
    source = "from pipelines import fetch\nfrom .. import VramSettings\nfrom pipelines import demo\n"
    assert [m for _, m in imported_modules(model, source)] == [
        "pipelines", "pipelines.core.download", "pipelines", "pipelines.core.vram", "pipelines", "pipelines.demo"]
    runner_file = ROOT / "runner" / "build" / "pipeline.py"
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


@pytest.mark.parametrize("folder,limit", [("pipelines/core", MAX_FUNCTION_LINES), ("runner", MAX_FUNCTION_LINES),
                                          ("pipelines", MAX_ANY_FUNCTION_LINES)])
def test_functions_stay_short(folder, limit):
    long = []
    for path in python_files(folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {limit} lines (a room that wants splitting):\n" + "\n".join(long)


@pytest.mark.parametrize("package", PACKAGES)
def test_files_stay_short(package):
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in python_files(package)
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines (a room that wants splitting):\n" + "\n".join(long)


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


# ------------------------------------------------------------------- the runner's rooms

# the runner's layers (docs/architecture.md): a module belongs to the longest prefix that names it
ROOMS = {
    "runner": "ground", "runner.errors": "ground", "runner.files": "ground", "runner.records": "ground",
    "runner.owner": "ground", "runner.failpoints": "ground",
    "runner.config": "config", "runner.build": "build", "runner.tracking": "tracking",
    "runner.reporting": "reporting", "runner.execution": "execution",
    "runner.__main__": "entry", "runner.app": "entry", "runner.commands": "entry", "hydra_plugins": "entry",
}
ARROWS = {  # what each layer may import, besides itself
    "ground": set(),
    "config": {"ground"},
    "build": {"config", "ground"},
    "tracking": {"config", "ground"},
    "reporting": {"config", "ground"},
    "execution": {"build", "tracking", "reporting", "config", "ground"},
    "entry": {"execution", "build", "tracking", "reporting", "config", "ground"},
}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in ROOMS:
            return ROOMS[".".join(parts[:n])]
    return None


def arrow_violations(path: Path, source: str | None = None) -> list[str]:
    """The imports of a runner file that point against the arrows (type-checking imports run never)."""
    mine = room_of(module_name(path))
    bad = []
    for line, module in imported_modules(path, source, with_type_checking=False):
        theirs = room_of(module) if module.split(".")[0] in ("runner", "hydra_plugins") else None
        if theirs is not None and theirs != mine and theirs not in ARROWS[mine]:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {module} ({theirs})")
    return bad


def test_every_runner_module_has_its_room():
    homeless = [name for name in MODULES if name.startswith(("runner", "hydra_plugins")) and room_of(name) is None]
    assert not homeless, f"place them in a room of ROOMS (docs/architecture.md): {homeless}"


def test_the_arrows_between_the_runners_rooms_point_one_way():
    tracking = ROOT / "runner" / "tracking" / "store.py"  # the check itself sees a wrong arrow
    assert arrow_violations(tracking, "from ..execution import job\nfrom ..files import locked\n") == [
        "runner/tracking/store.py:1 (tracking) imports runner.execution (execution)",
        "runner/tracking/store.py:1 (tracking) imports runner.execution.job (execution)"]
    bad = [v for p in python_files("runner", "hydra_plugins") for v in arrow_violations(p)]
    assert not bad, "ground <- config <- build <- execution <- entry; tracking and reporting on config:\n" + \
        "\n".join(bad)


def test_a_job_never_reaches_a_launcher():
    """runner/execution/run.py decides where a job runs; job.py computes it here."""
    job = ROOT / "runner" / "execution" / "job.py"
    bad = [m for _, m in imported_modules(job) if m.startswith(("runner.execution.ray", "runner.execution.warm"))]
    assert not bad, bad


def test_mlflow_is_imported_only_in_tracking():
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in python_files(*PACKAGES, "hydra_plugins")
           if not p.is_relative_to(ROOT / "runner" / "tracking")
           for line, module in imported_modules(p) if module.split(".")[0] == "mlflow"]
    assert not bad, "MLflow belongs to runner/tracking:\n" + "\n".join(bad)


def test_hydras_internals_only_where_hydra_has_no_public_api():
    """The sweep's Composer applies a job's values with Hydra's own code (config/compose.py says why)."""
    allowed = ROOT / "runner" / "config" / "compose.py"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in python_files("runner", "hydra_plugins")
           for line, module in imported_modules(p) if module.startswith("hydra._internal") and p != allowed]
    assert not bad, bad


# ------------------------------------------------------------------- import circles


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` its import statements name (inside functions too; not
    those for type checkers only)."""
    graph: dict[str, set[str]] = {}
    for path in python_files(package):
        name = module_name(path)
        graph[name] = {module for _, module in imported_modules(path, with_type_checking=False)
                       if module in MODULES and module != name and module.split(".")[0] == package}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    found = circles(import_graph(package))
    assert not found, "modules that import each other (imports inside functions count):\n" + \
        "\n".join(" <-> ".join(group) for group in found)


# ----------------------------------------------------------------- private names


def borrowed_private_names(path: Path, source: str | None = None) -> list[str]:
    """`from x import _y` and `x._y` where x is another module of the project: a name its module
    keeps to itself (dunders and the library's declared `_EXPORTS` surface aside)."""
    tree = ast.parse(path.read_text() if source is None else source)
    own = module_name(path)
    bound: dict[str, str] = {}  # a local name -> the project module it names
    bad = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as x` binds x to a.b
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top
            continue
        module = from_module(package, node)
        if module not in MODULES or module == own:
            continue
        for alias in node.names:
            if f"{module}.{alias.name}" in MODULES:
                bound[alias.asname or alias.name] = f"{module}.{alias.name}"
            elif alias.name.startswith("_") and not alias.name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            chain = []
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                target = ".".join([bound[base.id], *chain])
                if target in MODULES and target != own:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    return sorted(set(bad))


def test_the_private_name_check_sees_both_forms():
    path = ROOT / "runner" / "execution" / "sweep.py"
    source = "from . import job\nfrom ..files import _NO_HARD_LINKS\njob._fail(None)\nlen(job.__name__)\n"
    assert borrowed_private_names(path, source) == [
        "runner/execution/sweep.py:2 imports runner.files._NO_HARD_LINKS",
        "runner/execution/sweep.py:3 uses runner.execution.job._fail"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_borrowed_across_modules(package):
    bad = [v for p in python_files(package) for v in borrowed_private_names(p)]
    assert not bad, "make the name public, or keep its use in its module:\n" + "\n".join(bad)


# ------------------------------------------------------------ what the packages ship

TEST_SERVER_NAME = re.compile(r"(^|_)(server|servers|fake|mock|stub)(_|$)|^(test|conftest)")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_test_server_ships_in_the_packages(package):
    """Loopback hubs and other test-only helpers live in tests/support, not in what users install."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in python_files(package)
           for line, module in imported_modules(p) if module.split(".")[0] in ("http", "socketserver")
           and module != "http" and module.startswith(("http.server", "socketserver"))]
    bad += [f"{p.relative_to(ROOT)} is named like test code" for p in python_files(package)
            if TEST_SERVER_NAME.search(p.stem)]
    assert not bad, bad
