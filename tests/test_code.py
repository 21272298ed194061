"""Rules of the code base, checked: no public function takes more than a dozen parameters
(settings travel as objects; the exceptions are the CLI's commands, one option each, and a
dataclass's constructor, which is its fields), every module says what it is and stays short
enough to read (as do its functions), the run path looks nothing up by name, and only flows/
imports Prefect or MLflow."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extractors", "heads", "flows")
MOST_PARAMETERS = 12
MOST_MODULE_LINES = 450
MOST_FUNCTION_LINES = 80  # docstring included


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.endswith(".__main__"):  # importing it runs the command line
                names.append(info.name)
    return names


def _public_callables(module) -> list[tuple[str, object]]:
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            record = dataclasses.is_dataclass(obj)  # its __init__ is its fields, not a signature
            for attr, member in vars(obj).items():
                if record and attr == "__init__":
                    continue
                if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                    found.append((f"{name}.{attr}", member))
    return found


@pytest.mark.parametrize("name", _modules())
def test_no_public_function_takes_more_than_a_dozen_parameters(name: str) -> None:
    module = importlib.import_module(name)
    too_many = {}
    for qualname, fn in _public_callables(module):
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        command = name.startswith("flows.cli.") and hasattr(fn, "__signature__")
        if len(params) > MOST_PARAMETERS and not command:
            too_many[qualname] = len(params)
    assert not too_many, f"{name}: {too_many}"


def test_every_module_says_what_it_is() -> None:
    for path in sorted(ROOT.glob("[efh]*/**/*.py")):
        if path.parts[len(ROOT.parts)] in PACKAGES:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no module docstring"


def test_only_flows_imports_prefect_or_mlflow() -> None:
    for package in ("extractors", "heads"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                bad = [n for n in names if n.split(".")[0] in ("prefect", "mlflow", "flows")]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _sources() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def test_modules_and_functions_stay_short() -> None:
    """One job per module and named phases per function: a module over 450 lines or a
    function over 80 is two of them."""
    long = []
    for path in _sources():
        text = path.read_text()
        name = path.relative_to(ROOT)
        if text.count("\n") > MOST_MODULE_LINES:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MOST_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}() is {lines} lines")
    assert not long, "\n".join(long)


def test_the_run_path_looks_nothing_up_by_name() -> None:
    """Steps and runs are called, not found: no importlib, globals() or edited __wrapped__
    in the packages (flows/__init__.py compiles bytecode with importlib.util; metadata
    lookups of package versions are not code lookups)."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "globals":
                found.append(f"{path.relative_to(ROOT)}: globals()")
            elif isinstance(node, ast.Attribute) and node.attr == "__wrapped__":
                found.append(f"{path.relative_to(ROOT)}: __wrapped__")
            elif isinstance(node, ast.Attribute) and node.attr == "import_module":
                found.append(f"{path.relative_to(ROOT)}: import_module")
    assert not found, found
