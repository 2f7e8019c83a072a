"""The module boundaries the architecture promises: checked, so that they stay true."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "liftplace"
# Import cycles among liftplace's modules that are known and allowed, each a frozenset of
# module names: none.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def import_time_imports(path: Path, name: str, functions: bool = False) -> set[str]:
    """What importing the module at ``path`` imports: its import statements outside functions
    (and outside ``if TYPE_CHECKING:``), each with its parent packages (their __init__ runs first);
    with ``functions``, those inside function bodies too (what calling them imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not functions:
                continue
            if _type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    with_parents = set()
    for module in found:
        parts = module.split(".")
        with_parents.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return with_parents


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


@pytest.mark.parametrize("functions", [False, True], ids=["at-import", "in-function-bodies-too"])
def test_no_import_cycles_among_the_librarys_modules(functions):
    """No circle among the modules, not even one closed by an import inside a function (such as a
    study's command line importing the runner that imports the study module)."""
    modules = library_modules()
    graph = {name: {m for m in import_time_imports(path, name, functions) if m in modules and m != name}
             for name, path in modules.items()}
    assert {"liftplace.runner.study", "liftplace.preflight", "liftplace.dotted"} <= set(graph)  # the walk sees them
    cycles = [c for c in import_cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c) + ")" for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    module = tmp_path / "pkg" / "mod.py"
    module.parent.mkdir()
    module.write_text("from typing import TYPE_CHECKING\nimport x.y\nfrom . import z\n"
                      "if TYPE_CHECKING:\n    import hidden\ndef f():\n    import later\n")
    assert import_time_imports(module, "pkg.mod") == {"typing", "typing.TYPE_CHECKING", "x", "x.y", "pkg", "pkg.z"}
    assert import_time_imports(module, "pkg.mod", functions=True) == {"typing", "typing.TYPE_CHECKING", "x", "x.y",
                                                                      "pkg", "pkg.z", "later"}


def test_only_the_runner_package_imports_ray():
    # Any `import ray` or `from ray...`, in a function too.
    users = sorted(str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*.py")
                   if any(m == "ray" or m.startswith("ray.") for m in imported_modules(p)))
    assert users and all(u.startswith("runner/") for u in users), users


def test_the_study_and_preflight_modules_do_not_import_ray():
    # A study's command line and a run's inputs are read and refused without Ray's start-up cost.
    code = "import sys, liftplace.study, liftplace.preflight; " \
           "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_analysis_never_imports_the_training_loop():
    for path in (ROOT / "analysis").glob("*.py"):
        modules = imported_modules(path)
        assert not any(m == "liftplace.distill" or m == "liftplace.runner" or m.startswith("liftplace.runner.")
                       for m in modules), path.name


def test_the_library_imports_nothing_from_studies_or_analysis():
    for path in LIBRARY.rglob("*.py"):
        top = {m.split(".")[0] for m in imported_modules(path)}
        assert not top & {"studies", "analysis", "make_all", "common"}, path.name


def test_every_module_says_its_one_job_first():
    for path in LIBRARY.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(ROOT)}: no docstring"
