"""hwnoise.evaluate on the bundled SmolLM2-135M: a fixed seed gives identical completions, noise
included (must-show 3), and batched left-padded generation matches one prompt at a time."""

from __future__ import annotations

import pytest

from hwnoise.eval import (
    RECORDS_FILE,
    build_prompts,
    evaluate,
    generate_greedy,
    read_records,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    return load("default")


@pytest.fixture(scope="module")
def arith():
    from hwnoise.data import load_problems

    return load_problems("arith", n=4, seed=0)


def test_fixed_seed_identical_completions_noise_included(bundled, arith, tmp_path):
    model, tokenizer = bundled
    settings = ["relative:0.2@ops", "weights:nvfp4"]
    for run in ("a", "b"):
        evaluate(model, tokenizer, arith, settings, batch_size=2, max_new_tokens=12, seed=7, out=tmp_path / run)
    a = read_records(tmp_path / "a" / RECORDS_FILE)
    b = read_records(tmp_path / "b" / RECORDS_FILE)
    assert len(a) == 4 * 3
    assert a == b
    noisy = [a[("relative:0.2@ops", p.id)]["completion"] for p in arith]
    clean = [a[("clean", p.id)]["completion"] for p in arith]
    assert noisy != clean  # the noise is on, and replayed exactly


def test_batched_equals_one_at_a_time(bundled, arith):
    model, tokenizer = bundled
    prompts = build_prompts(tokenizer, [p.question for p in arith])
    assert len({len(p.ids) for p in prompts}) > 1
    batched = generate_greedy(model, tokenizer, prompts, 8)
    single = [generate_greedy(model, tokenizer, [p], 8)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
