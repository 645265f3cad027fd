"""The package's layers, written down as data and checked on what each module really imports.

A module may import, when it is imported, modules of its own layer or of a lower one, never of a
higher one (a lower layer must be usable without the layers built on it). The import statements
each module runs while it is imported are recorded (``__import__`` and ``importlib.import_module``,
importer -> imported) in one fresh interpreter that imports every module of the package; a module's
dependencies are everything reachable from it and from its parent packages in that graph, which is
what a fresh interpreter importing that module alone would load (indirect imports count too). One
interpreter instead of one per unit: the same edges, without paying torch's import ~40 times.

``hwnoise/__init__.py`` is the top-level package: it re-exports the public API and so imports
nearly every layer, and Python runs it before any ``hwnoise.X`` can be imported. It cannot be lazy
without a trap: ``hwnoise.inject`` and ``hwnoise.scan`` are functions there that share their names
with subpackages, and importing the subpackage later would rebind the attribute to the module.
So the check imports each unit under a bare ``hwnoise`` package object (the real ``__path__``,
its ``__init__`` not run): what is measured is the unit's own imports, nothing else.

Imports inside functions (deferred until used) are not import-time dependencies and are not
checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Lowest first. A unit is a top-level module or subpackage of hwnoise, or a dotted submodule that
# sits higher than its package (the longest listed prefix decides). Same-layer imports are allowed.
LAYERS: tuple[tuple[str, ...], ...] = (
    # base: no hwnoise imports beyond one another
    ("io", "errors", "select", "devices", "rewards", "data", "plans", "progress", "models",
     "formats", "metrics"),
    # mechanisms that change a model
    ("inject", "aqn"),
    # the emulation language (one hardware condition), and the process-wide switch on top of inject
    ("emulation", "autoload", "identity"),
    # what measures a model
    ("scan", "eval", "mismatch", "engines"),
    ("rl",),
    ("integrations",),
    ("cli",),
)
# Modules that are entry points, not importable units (running them starts the CLI).
NOT_IMPORTED = {"hwnoise.cli.__main__"}
# Third-party packages an optional integration needs; a unit that cannot import them is skipped.
OPTIONAL_DEPS = {"verl", "ray", "hydra", "vllm", "omegaconf", "tensordict"}

SRC = Path(__file__).resolve().parents[1] / "src"

_CHILD = r"""
import builtins, importlib, importlib.util, json, sys, traceback, types
root, path, modules = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
package = root
sys.path.insert(0, path)
spec = importlib.util.find_spec(package)
bare = types.ModuleType(package)  # the package without running its __init__
bare.__path__, bare.__spec__ = list(spec.submodule_search_locations), spec
sys.modules[package] = bare
edges = {}  # importer -> modules of the package its import statements named


def inside(name):
    return isinstance(name, str) and name.startswith(package + ".")


def record(importer, target, fromlist=()):
    if not inside(importer):
        return
    found = edges.setdefault(importer, set())
    for name in [target] + [f"{target}.{f}" for f in fromlist or () if f != "*"]:
        if inside(name) and (name == target or name in sys.modules):
            found.add(name)


real_import, real_import_module = builtins.__import__, importlib.import_module


def hooked_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__")
    if inside(importer):
        target = importlib.util.resolve_name("." * level + name, globals.get("__package__") or importer) if level else name
        record(importer, target, fromlist)
    return module


def hooked_import_module(name, package=None):
    module = real_import_module(name, package)
    record(sys._getframe(1).f_globals.get("__name__"), module.__name__)
    return module


builtins.__import__, importlib.import_module = hooked_import, hooked_import_module
missing, failed = {}, {}
for unit in modules:
    try:
        real_import_module(unit)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != package:
            missing[unit] = err.name
        else:
            failed[unit] = traceback.format_exc()[-3000:]
    except Exception:
        failed[unit] = traceback.format_exc()[-3000:]
print(json.dumps({"edges": {k: sorted(v) for k, v in edges.items()}, "missing": missing, "failed": failed}))
"""


def unit_of(module: str, package: str, layers) -> str | None:
    """The listed unit ``module`` belongs to (longest dotted prefix), or None."""
    parts = module.split(".")[1:]
    listed = {u for layer in layers for u in layer}
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in listed:
            return candidate
    return None


def layer_index(layers) -> dict[str, int]:
    return {unit: i for i, layer in enumerate(layers) for unit in layer}


def violations(imported: dict[str, list[str]], layers, package: str = "hwnoise") -> list[str]:
    """For each imported unit, the modules it pulled in from a higher layer (or from no layer)."""
    index = layer_index(layers)
    out = []
    for module, pulled in sorted(imported.items()):
        own = unit_of(module, package, layers)
        if own is None:
            out.append(f"{module} is in no layer; add it to LAYERS")
            continue
        for other in pulled:
            unit = unit_of(other, package, layers)
            if unit is None:
                out.append(f"{module} imports {other}, which is in no layer")
            elif index[unit] > index[own]:
                out.append(f"{module} (layer {index[own]}: {own}) imports {other} (layer {index[unit]}: {unit})")
    return out


def package_modules(package: str, path: Path) -> list[str]:
    """Every module of the package below its top level, from the files."""
    root = path / package
    out = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(path).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if len(parts) > 1 and "__pycache__" not in parts:
            out.append(".".join(parts))
    return out


def reachable(module: str, edges: dict[str, list[str]], package: str) -> set[str]:
    """``module``, its parent packages and everything their import statements reach (the modules a
    fresh interpreter importing ``module`` alone would load)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name == package:
            continue
        seen.add(name)
        todo.extend(edges.get(name, ()))
        if "." in name:
            todo.append(name.rsplit(".", 1)[0])  # importing a.b.c runs a.b's __init__ first
    return seen


def import_closure(package: str, path: Path, skip=frozenset()) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``{module: modules of the package it imports}`` for every module of the package, from the
    import graph one fresh interpreter records; and ``{module: missing third-party dependency}``."""
    modules = [m for m in package_modules(package, path) if m not in skip]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-c", _CHILD, package, str(path), json.dumps(modules)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"the import graph child failed:\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["failed"], "importing failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    missing = result["missing"]
    imported = {m: sorted(reachable(m, result["edges"], package) - {m}) for m in modules if m not in missing}
    return imported, missing


@pytest.fixture(scope="module")
def hwnoise_imports():
    return import_closure("hwnoise", SRC, skip=NOT_IMPORTED)


def test_every_module_is_in_a_layer():
    listed = {u for layer in LAYERS for u in layer}
    assert len(listed) == sum(map(len, LAYERS)), "a unit is listed twice"
    unplaced = [m for m in package_modules("hwnoise", SRC) if unit_of(m, "hwnoise", LAYERS) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    stale = [u for u in listed if not (SRC / "hwnoise" / u.replace(".", "/")).exists()
             and not (SRC / "hwnoise" / (u.replace(".", "/") + ".py")).exists()]
    assert not stale, f"LAYERS names units that do not exist: {stale}"


def test_no_module_imports_a_higher_layer(hwnoise_imports):
    imported, missing = hwnoise_imports
    assert not {dep.split(".")[0] for dep in missing.values()} - OPTIONAL_DEPS, missing
    # the check saw the package: every top-level unit that could be imported, and what they import
    assert len(imported) >= 20, sorted(imported)
    assert "hwnoise.inject" in imported["hwnoise.emulation"]  # (a real edge, so the data is not empty)
    found = violations(imported, LAYERS)
    assert not found, "upward imports at import time:\n" + "\n".join(found)


def test_the_emulation_language_sits_above_inject_and_below_what_measures():
    index = layer_index(LAYERS)
    assert index["inject"] < index["emulation"] < index["eval"] <= index["rl"] < index["integrations"]
    assert index["formats"] < index["inject"] and index["select"] < index["inject"]


def test_checker_reports_a_violation_in_a_synthetic_package(tmp_path):
    """The same checker, on a package whose low layer imports its high one: it must say so."""
    pkg = tmp_path / "layerpkg"
    (pkg / "high").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package __init__ must not run')\n")
    (pkg / "base.py").write_text("from . import high  # upward\n")
    (pkg / "high" / "__init__.py").write_text("from .. import mid\n")
    (pkg / "high" / "extra.py").write_text("X = 1\n")
    (pkg / "mid.py").write_text("")
    layers = (("base",), ("mid",), ("high",))
    imported, missing = import_closure("layerpkg", tmp_path)
    # every top-level unit in its own interpreter; high.extra too (nothing imported it)
    assert not missing and set(imported) == {"layerpkg.base", "layerpkg.high", "layerpkg.mid", "layerpkg.high.extra"}
    found = violations(imported, layers)
    assert found == ["layerpkg.base (layer 0: base) imports layerpkg.high (layer 2: high)",
                     "layerpkg.base (layer 0: base) imports layerpkg.mid (layer 1: mid)"], found
    # the correct order passes; an unlisted module is named
    assert violations(imported, (("mid",), ("high", "base"))) == []
    unlisted = violations(imported, (("base",), ("high",)))
    assert "layerpkg.base imports layerpkg.mid, which is in no layer" in unlisted
    assert "layerpkg.mid is in no layer; add it to LAYERS" in unlisted
