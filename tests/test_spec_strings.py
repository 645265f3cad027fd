"""Every emulation spec string the project shows (README, examples, tests) parses and round-trips.

The collector reads README.md and examples/** (yaml, sh, md) with patterns for the places a spec
appears (``--setting SPEC``, ``emulation...=SPEC``, ``rollout: SPEC`` / ``training: SPEC``) and
walks the AST of tests/*.py for string literals given to ``Emulation.parse`` or after
``"--setting"`` (outside ``pytest.raises`` blocks, where bad specs are meant to fail). Each spec:
``Emulation.parse(s)`` works, ``str(e)`` parses back to an equal Emulation and is a fixed point.

The format and error sub-specs inside them go through their own registries
(``hwnoise.formats.get``, ``hwnoise.errors.parse``), which have no canonical string form of their
own: for them the check is that the registry parses the spec the Emulation kept, to the same
object as the spec as written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from hwnoise import errors as E
from hwnoise import formats
from hwnoise.emulation import Emulation
from hwnoise.plans import is_plan_spec

ROOT = Path(__file__).resolve().parents[1]
# placeholders in prose ("weights:FMT", "ERROR@ops") are not specs
_PLACEHOLDER = re.compile(r"\b(FMT|ERROR|SPEC|SIGMA|T1|G1|OPS)\b")
_DOC_PATTERNS = (
    re.compile(r"--setting[ =]+[\"']?([^\"'\s`\\]+)"),
    re.compile(r"\bemulation(?:\.rollout|\.training)?=[\"']?([^\"'\s`\\]+)"),
    re.compile(r"\b(?:rollout|training):\s*[\"`]?([A-Za-z][^\"'\s`,}]*)"),
)


def _usable(spec: str) -> bool:
    return bool(spec) and spec not in ("null", "none", "None") and not _PLACEHOLDER.search(spec)


def doc_specs() -> list[tuple[str, str]]:
    """``(spec, where)`` occurrences in README.md, docs/*.md and examples/** (yaml, sh, md)."""
    out: list[tuple[str, str]] = []
    # the reference moved out of the README (docs/lm-eval.md etc. quote bad specs on purpose)
    moved = ("glossary", "scan", "eval", "train", "formats", "noise", "models", "verl-keys", "benchmarks")
    files = [ROOT / "README.md"] + [ROOT / "docs" / f"{name}.md" for name in moved] + sorted(
        p for ext in ("yaml", "yml", "sh", "md") for p in (ROOT / "examples").rglob(f"*.{ext}"))
    for path in files:
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        if path.suffix in (".yaml", ".yml"):
            emulation = (yaml.safe_load(text) or {}).get("emulation") or {}
            for phase in ("rollout", "training"):
                if isinstance(emulation.get(phase), str):
                    out.append((emulation[phase], f"{where} emulation.{phase}"))
            continue
        for pattern in _DOC_PATTERNS:
            for match in pattern.finditer(text):
                spec = match.group(1).rstrip(".;:)")
                if _usable(spec) and (":" in spec or spec == "clean"):
                    out.append((spec, f"{where}:{text.count(chr(10), 0, match.start()) + 1}"))
    return out


def _is_emulation_parse(node) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return isinstance(func, ast.Attribute) and func.attr == "parse" and bool(node.args) and (
        (isinstance(func.value, ast.Name) and func.value.id == "Emulation")
        or (isinstance(func.value, ast.Attribute) and func.value.attr == "Emulation"))


class _TestStrings(ast.NodeVisitor):
    """Literals given to Emulation.parse or after "--setting" inside test bodies (not under
    pytest.raises), and the first column of a parametrize table whose parameter the test passes
    to Emulation.parse outside pytest.raises."""

    def __init__(self, where: str):
        self.where, self.found, self._raises, self._in_function = where, [], 0, 0
        self._parsed_names: set[str] = set()

    def visit_FunctionDef(self, node):
        outer = self._parsed_names
        self._parsed_names = set()
        self._in_function += 1
        for statement in node.body:
            self.visit(statement)
        self._in_function -= 1
        for decorator in node.decorator_list:  # parametrize tables of a parameter parsed in the body
            if (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"
                    and len(decorator.args) >= 2 and isinstance(decorator.args[0], ast.Constant)
                    and isinstance(decorator.args[1], (ast.List, ast.Tuple))):
                first = decorator.args[0].value.replace(" ", "").split(",")[0]
                if first in self._parsed_names:
                    for row in decorator.args[1].elts:
                        self._add(row.elts[0] if isinstance(row, (ast.Tuple, ast.List)) and row.elts else row)
        self._parsed_names = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_With(self, node):
        raises = any(isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "attr", "") == "raises"
                     for i in node.items)
        self._raises += raises
        self.generic_visit(node)
        self._raises -= raises

    def _add(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not self._raises:
            self.found.append((node.value, f"{self.where}:{node.lineno}"))

    def visit_Call(self, node):
        if _is_emulation_parse(node) and not self._raises:
            if isinstance(node.args[0], ast.Name):
                self._parsed_names.add(node.args[0].id)
            self._add(node.args[0])
        self.generic_visit(node)

    def _sequence(self, node):
        if self._in_function:
            for before, item in zip(node.elts, node.elts[1:]):
                if isinstance(before, ast.Constant) and before.value == "--setting":
                    self._add(item)
        self.generic_visit(node)

    visit_List = visit_Tuple = _sequence


def test_specs() -> list[tuple[str, str]]:
    """``(spec, where)`` occurrences in tests/*.py (and tests/verl/*.py)."""
    out = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        visitor = _TestStrings(str(path.relative_to(ROOT)))
        visitor.visit(ast.parse(path.read_text()))
        out += visitor.found
    return out


test_specs.__test__ = False  # a collector, not a test


def all_specs() -> dict[str, str]:
    """``{spec: first place seen}``."""
    out: dict[str, str] = {}
    for spec, where in test_specs() + doc_specs():
        out.setdefault(spec, where)
    return out


def test_the_collector_finds_the_specs_it_should():
    docs, tests = doc_specs(), test_specs()
    # floors, so that an empty or broken collector cannot pass the round-trip test below
    doc_files = {where.split(":")[0].split(" ")[0] for _, where in docs}
    assert len(docs) >= 20 and len(doc_files) >= 10, docs
    assert len(tests) >= 20 and len({s for s, _ in tests}) >= 15, tests
    found = {s for s, _ in docs}
    assert "weights:nvfp4+relative:0.01@ops" in found  # README's `hwnoise eval --setting` example
    assert ("relative:0.05@ops", "examples/noise.yaml emulation.rollout") in docs
    assert not any(_PLACEHOLDER.search(s) for s in found), found
    assert "relative:0.05@somewhere" not in {s for s, _ in tests}  # a bad spec of an error-message table


SPECS = sorted(all_specs().items())


@pytest.mark.parametrize("spec, where", SPECS, ids=[s for s, _ in SPECS])
def test_spec_parses_and_round_trips(spec, where, tmp_path, monkeypatch):
    if spec.startswith("weights:") and is_plan_spec(spec.partition(":")[2].split("+")[0]):
        pytest.skip(f"{spec} ({where}) names a plan file that exists only where that command ran")
    e = Emulation.parse(spec)
    canonical = str(e)
    again = Emulation.parse(canonical)
    assert again == e, f"{spec!r} ({where}): str() gave {canonical!r}, which parses to {again!r}"
    assert str(again) == canonical, f"{spec!r} ({where}): {canonical!r} is not a fixed point"
    # the sub-specs went to their registries and kept their meaning
    for part in (p.strip() for p in spec.split("+")):
        head, _, rest = part.partition(":")
        if head.lower() in ("weights", "weight", "w") and not is_plan_spec(rest.strip()):
            assert formats.get(e.weight_format) == formats.get(rest.strip())
        elif head.lower() in ("inputs", "input", "a"):
            assert formats.get(e.input_format) == formats.get(rest.strip())
        elif E.is_name(head.strip().lower()):
            assert E.parse(e.error) == E.parse(part.partition("@")[0])


def test_a_spec_that_does_not_round_trip_would_be_caught():
    """The round-trip assertion can fail: a spec written differently still parses equal, and a
    different one does not."""
    assert Emulation.parse("W:mxfp4 + aqn:0.010") == Emulation.parse("weights:mxfp4+aqn:0.01")
    assert str(Emulation.parse("W:mxfp4 + aqn:0.010")) == "weights:mxfp4+aqn:0.01"
    assert Emulation.parse("weights:mxfp4+aqn:0.01") != Emulation.parse("weights:mxfp4+aqn:0.02")
