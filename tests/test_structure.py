"""The module boundaries the architecture promises: checked, so that they stay true."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_study_module_does_not_import_ray():
    # A study's command line is read and refused without Ray's start-up cost.
    code = "import sys, liftplace.study; bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_sweep_imports_ray_in_the_library():
    users = sorted(p.name for p in (ROOT / "liftplace").glob("*.py")
                   if any(m == "ray" or m.startswith("ray.") for m in imported_modules(p)))
    assert users == ["sweep.py"]


def test_analysis_never_imports_the_training_loop():
    for path in (ROOT / "analysis").glob("*.py"):
        modules = imported_modules(path)
        assert "liftplace.distill" not in modules and "liftplace.sweep" not in modules, path.name


def test_the_library_imports_nothing_from_studies_or_analysis():
    for path in (ROOT / "liftplace").glob("*.py"):
        top = {m.split(".")[0] for m in imported_modules(path)}
        assert not top & {"studies", "analysis", "make_all", "common"}, path.name
