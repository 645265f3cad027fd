"""Selection corners: the root module is a candidate, and a default-excluded module (lm_head) is
selected when a target names it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import hwnoise as hn
from hwnoise.errors import Quantize, RelativeGaussian
from hwnoise.select import DEFAULT_EXCLUDE, select_modules
from test_inject_models import tiny_llama, tokens

README = Path(__file__).resolve().parents[1] / "docs" / "noise.md"  # the hn.inject snippet (moved from the README)


def test_inject_on_a_bare_module_selects_the_root():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    clean = lin(x)
    with hn.inject(lin, RelativeGaussian(0.1), targets="linear") as handle:
        noisy = lin(x)
    assert handle.sites == [""]
    assert handle.stats()[""].calls == 1
    assert not torch.equal(noisy, clean)
    assert torch.equal(lin(x), clean)
    weight = lin.weight
    with hn.inject(lin, Quantize("mxfp4"), where="weight", targets="linear"):
        w4 = lin(x)
    torch.testing.assert_close(w4, torch.nn.functional.linear(x, hn.quantize(weight.detach(), "mxfp4"), lin.bias),
                               rtol=0, atol=1e-6)
    assert lin._parameters["weight"] is weight


def test_select_modules_root_is_a_candidate_but_globs_never_match_it():
    lin = nn.Linear(4, 4)
    assert select_modules(lin, "linear") == {"": lin}
    with pytest.raises(ValueError, match="has no submodules"):
        select_modules(lin, "*")
    model = tiny_llama(1)  # a whole model's root is not itself a linear
    assert "" not in select_modules(model, "linear")


def test_lm_head_selectable_when_named_explicitly():
    model = tiny_llama(1)
    assert "lm_head" not in select_modules(model, "linear")
    assert "lm_head" not in select_modules(model, "*")  # a catch-all glob does not name it
    picked = select_modules(model, ["linear", "lm_head"])
    assert "lm_head" in picked and "model.layers.0.mlp.down_proj" in picked
    assert list(select_modules(model, "lm_head")) == ["lm_head"]
    assert list(select_modules(model, "*embed_tokens")) == ["model.embed_tokens"]
    with pytest.raises(ValueError, match="matched no module"):  # the user's own exclude still applies
        select_modules(model, "lm_head", exclude=["lm_head"])
    ids = tokens()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with hn.inject(model, RelativeGaussian(0.1), targets="lm_head") as handle:
            noisy = model(input_ids=ids).logits
    assert handle.sites == ["lm_head"] and not torch.equal(noisy, clean)


def test_readme_inject_snippet_exclude_is_not_a_default_exclude():
    # An exclude of something always excluded does nothing; the snippet must show one that acts.
    snippets = re.findall(r"hn\.inject\([^\n]*exclude=\[([^\]]*)\]", README.read_text())
    assert snippets
    for items in snippets:
        for item in re.findall(r"['\"]([^'\"]+)['\"]", items):
            assert item not in DEFAULT_EXCLUDE, item
