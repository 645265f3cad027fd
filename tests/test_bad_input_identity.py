"""hwnoise.identity: a run's identity holds every input that changes its result (issue 20 item 4)."""

from __future__ import annotations

import json

import pytest
import torch

from hwnoise.identity import (IdentityMismatch, check_same_identity, identity_differences, model_placement,
                              plan_digest, run_identity)


def _plan(path, fmt="mxfp8_e4m3"):
    path.write_text(json.dumps({"model.layers.0.mlp.down_proj": fmt}))
    return path


def test_a_plan_enters_the_identity_by_its_content_not_its_path(tmp_path):
    plan = _plan(tmp_path / "plan.json")
    before = run_identity("m", ["clean", f"weights:{plan}"], dtype="fp32", device="cpu")
    # the same content re-written with other whitespace: the same plan
    plan.write_text(json.dumps({"model.layers.0.mlp.down_proj": "mxfp8_e4m3"}, indent=4))
    assert run_identity("m", ["clean", f"weights:{plan}"], dtype="fp32", device="cpu") == before
    _plan(plan, "mxfp4")  # edited in place: another plan at the same path
    after = run_identity("m", ["clean", f"weights:{plan}"], dtype="fp32", device="cpu")
    assert after["settings"] == before["settings"] and after["plans"] != before["plans"]
    differ = identity_differences(before, after)
    assert len(differ) == 1 and "plan.json" in differ[0] and "edited" in differ[0]


def test_dtype_device_engine_and_model_each_change_the_identity():
    base = run_identity("m", ["clean"], dtype="fp32", device="cpu")
    for key, value in (("dtype", "fp16"), ("device", "cuda"), ("engine", "vllm"), ("model", "other")):
        changed = run_identity(**{"model": "m", "settings": ["clean"], "dtype": "fp32", "device": "cpu",
                                  key: value})
        assert identity_differences(base, changed) == [f"{key}: {base[key]!r} there, {value!r} now"]
    assert identity_differences(base, dict(base)) == []


def test_a_stored_identity_lacking_a_key_is_not_taken_as_the_same():
    current = run_identity("m", ["clean"], dtype="fp32", device="cpu")
    old = {k: v for k, v in current.items() if k != "dtype"}
    with pytest.raises(IdentityMismatch, match=r"dtype: '<not recorded>' there, 'fp32' now.*use a new --out"):
        check_same_identity(old, current, "out/", "use a new --out")


def test_model_placement_reads_the_real_dtype_and_device():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert model_placement(model) == ("fp32", "cpu")
    model[1].half()
    assert model_placement(model) == ("fp16+fp32", "cpu")


def test_plan_digest_differs_for_another_format(tmp_path):
    assert plan_digest({"a": "mxfp4"}) != plan_digest({"a": "mxfp8_e4m3"})
    assert plan_digest({"a": "mxfp4", "b": "nvfp4"}) == plan_digest({"b": "nvfp4", "a": "mxfp4"})
