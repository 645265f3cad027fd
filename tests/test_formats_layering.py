"""Imports point down in formats/, scan/ and eval/: no function-local imports of hwnoise modules
(an import inside a function is how a cycle hides), and every formats module imports first in a
fresh interpreter (no module relies on another having been imported before it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hwnoise"
CHECKED = ("formats", "scan", "eval")
# The only hwnoise import allowed inside a function: the top-level package's __version__ (the
# package imports these subpackages, so a module-level import of it would be circular).
ALLOWED = {("..", "__version__"),
           # hwnoise.engines builds on eval.generate while eval.core picks an engine: a real cycle,
           # imported on use until generation moves below eval (named here so it is not a second one)
           ("..engines", "evaluation_engine")}


def _files():
    return sorted(p for d in CHECKED for p in (SRC / d).glob("*.py"))


def function_local_hwnoise_imports(source: str) -> list[tuple[int, str]]:
    """(line, "from X import Y") for each import of a hwnoise module inside a function."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                if node.level == 0 and not module.startswith("hwnoise"):
                    continue  # third party (matplotlib, rich, scipy, transformers): optional and heavy, lazily
                names = [a.name for a in node.names]
                if all((module, n) in ALLOWED for n in names):
                    continue
                found.append((node.lineno, f"from {module} import {', '.join(names)}"))
            elif isinstance(node, ast.Import):
                found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] == "hwnoise"]
    return found


def test_the_check_finds_a_function_local_import():
    source = "import torch\n\ndef f():\n    from .registry import get\n    import matplotlib\n    return get\n"
    assert function_local_hwnoise_imports(source) == [(4, "from .registry import get")]
    assert function_local_hwnoise_imports("def f():\n    from .. import __version__\n") == []


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_function_local_hwnoise_imports(path):
    assert function_local_hwnoise_imports(path.read_text(encoding="utf-8")) == [], path


FORMATS_MODULES = sorted(p.stem for p in (SRC / "formats").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", FORMATS_MODULES)
def test_each_formats_module_imports_first_in_a_fresh_interpreter(name):
    code = (f"import importlib; m = importlib.import_module('hwnoise.formats.{name}'); "
            f"assert m.__name__ == 'hwnoise.formats.{name}'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_registry_is_at_the_bottom():
    # registry imports none of the modules that use it (the old cycle: registry <-> fake_quant <-> encoding).
    tree = ast.parse((SRC / "formats" / "registry.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert imported and not imported & {"fake_quant", "encoding", "survey", "compiled"}, imported
