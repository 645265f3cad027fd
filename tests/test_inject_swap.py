"""Issue 21: one static swap. ``hwnoise.inject.swap.set_weight`` is the only function of the
package that writes ``module._parameters[...]``; the scan, the plan search, ``Emulation.applied``
and the verl stream go through the swap module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import hwnoise
from hwnoise.inject import swap

PACKAGE = Path(hwnoise.__file__).parent
_MUTATORS = {"pop", "update", "setdefault", "__setitem__", "__delitem__", "clear", "popitem"}


def _writers(source: str) -> list[str]:
    """Qualified names of the functions whose body writes ``X._parameters[...]`` (assignment,
    deletion, augmented assignment, a mutating dict method) or calls ``register_parameter``."""
    tree = ast.parse(source)
    found = []

    def params_subscript(node) -> bool:
        return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and \
            node.value.attr == "_parameters"

    def visit(node, stack):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack = stack + [node.name]
        hit = False
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            hit = any(params_subscript(t) for t in targets)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            hit = (f.attr in _MUTATORS and isinstance(f.value, ast.Attribute) and f.value.attr == "_parameters") or \
                f.attr == "register_parameter"
        if hit:
            found.append(".".join(stack) or "<module>")
        for child in ast.iter_child_nodes(node):
            visit(child, stack)

    visit(tree, [])
    return found


def test_one_function_in_the_package_writes_module_parameters():
    writers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _writers(path.read_text(encoding="utf-8")):
            writers.append(f"{path.relative_to(PACKAGE)}:{name}")
    assert sorted(set(writers)) == ["inject/swap.py:set_weight"], writers
    # The text agrees with the syntax tree (a write the AST walk might miss, e.g. in an f-string exec).
    text_hits = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if re.search(r"\._parameters\[[^\]]*\]\s*=(?!=)", p.read_text(encoding="utf-8"))]
    assert text_hits == ["inject/swap.py"], text_hits


def test_the_grep_finds_a_second_writer():  # the test above can fail
    assert _writers("def f(m, w):\n    m._parameters['weight'] = w\n") == ["f"]
    assert _writers("class A:\n    def g(self, m):\n        m._parameters.pop('weight')\n") == ["A.g"]
    assert _writers("def h(m):\n    x = m._parameters['weight']\n") == []


@pytest.mark.parametrize("user", ["emulation.py", "scan/core.py", "scan/plan.py", "integrations/verl/rollout.py",
                                  "inject/hooks.py"])
def test_the_static_roads_use_the_swap(user):
    text = (PACKAGE / user).read_text(encoding="utf-8")
    assert re.search(r"from \.+inject\.swap import|from \.swap import", text), user


def test_swapped_weights_restore_the_original_parameters_also_on_error():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    pa, pb = a.weight, b.weight
    before = pa.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with swap.swapped_weights([(a, torch.zeros(3, 4)), (b, torch.ones(3, 4))]):
            assert float(a.weight.abs().sum()) == 0 and float(b.weight.sum()) == 12
            assert a.weight is not pa and not a.weight.requires_grad
            raise RuntimeError("boom")
    assert a.weight is pa and b.weight is pb and torch.equal(pa, before)


def test_quantized_input_changes_only_the_wrapped_module_and_is_removed():
    torch.manual_seed(0)
    lin, other = nn.Linear(32, 4), nn.Linear(32, 4)
    x = torch.randn(2, 32)
    with swap.quantized_input(lin, lambda t: torch.zeros_like(t)):
        assert torch.allclose(lin(x), lin.bias.expand(2, 4))  # the input was replaced
        assert not torch.allclose(other(x), other.bias.expand(2, 4))  # another module is untouched
    assert not torch.allclose(lin(x), lin.bias.expand(2, 4))  # the hook is gone
    seen = []
    with swap.quantized_input({"a": lin, "b": other}, lambda t, name: seen.append(name) or t):
        lin(x), other(x)
    assert seen == ["a", "b"]


def test_set_weight_refuses_a_module_without_weight():
    with pytest.raises(ValueError, match="no weight"):
        swap.set_weight(nn.ReLU(), torch.zeros(1))
