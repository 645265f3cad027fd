"""hwnoise.data: the arithmetic generator checked by re-doing its arithmetic, and GSM8K loading."""

from __future__ import annotations

import ast
import json
import operator
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from hwnoise import data
from hwnoise.data import (
    INSTRUCTION,
    Problem,
    load_problems,
    prompt_messages,
    prompt_text,
)

GSM8K_TEST = Path(__file__).parents[2] / "shared/data/gsm8k/test.jsonl"
ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str):
    """Python's arithmetic on a calculator annotation's left side (numbers and + - * / only)."""
    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected syntax in annotation {expr!r}")
    return walk(ast.parse(expr, mode="eval").body)


def check_solution(problem: Problem) -> list[tuple[str, int]]:
    """Re-do a generated problem's arithmetic; return its (expression, value) steps."""
    lines = problem.answer.split("\n")
    assert lines[-1] == f"#### {problem.gold}"
    steps = ANNOTATION.findall(problem.answer)
    assert len(steps) == problem.level, problem.answer
    question_numbers = {int(x.replace(",", "")) for x in re.findall(r"[0-9][0-9,]*", problem.question)}
    known = set(question_numbers)
    value = None
    for expr, shown in steps:
        value = evaluate(expr)
        assert value == int(shown), f"{expr}={shown} in {problem.id}"
        assert value >= 0 and value == int(value), f"{expr} in {problem.id}"
        # Every operand is stated in the question or computed by an earlier step.
        for operand in re.findall(r"[0-9]+", expr):
            assert int(operand) in known, f"operand {operand} of {expr} not grounded in {problem.id}"
        known.add(int(value))
    assert str(int(value)) == problem.gold
    return [(expr, int(shown)) for expr, shown in steps]


# --------------------------------------------------------------------------------------------------
# The arithmetic generator
# --------------------------------------------------------------------------------------------------


def test_arith_default_count_ids_and_fields():
    problems = load_problems("arith")
    assert len(problems) == 256
    assert [p.id for p in problems[:3]] == ["arith-0-0", "arith-0-1", "arith-0-2"]
    assert len({p.id for p in problems}) == 256
    first = problems[0]
    assert first.to_dict() == {"id": first.id, "question": first.question, "answer": first.answer,
                               "gold": first.gold, "level": first.level}
    with pytest.raises(AttributeError):
        first.gold = "1"


def test_arith_is_deterministic_and_seed_dependent():
    a = load_problems("arith", n=64, seed=3)
    assert a == load_problems("arith", n=64, seed=3)
    b = load_problems("arith", n=64, seed=4)
    assert [p.question for p in a] != [p.question for p in b]
    assert len({p.question for p in a} & {p.question for p in b}) < 8
    assert b[0].id == "arith-4-0"
    # n keeps a prefix of the same stream.
    assert load_problems("arith", n=10, seed=3) == a[:10]


def test_arith_train_split_is_another_stream():
    test = load_problems("arith", n=32, seed=0)
    train = load_problems("arith", n=32, seed=0, split="train")
    assert [p.question for p in test] != [p.question for p in train]
    assert train[0].id == "arith-train-0-0"


def test_arith_levels():
    mixed = load_problems("arith", n=300, seed=1)
    counts = Counter(p.level for p in mixed)
    assert set(counts) == {1, 2, 3}
    assert all(abs(c - 100) <= 30 for c in counts.values()), counts
    one = load_problems("arith:level=1", n=100, seed=1)
    assert {p.level for p in one} == {1}
    assert one[0].id == "arith-l1-1-0"
    low = load_problems("arith:level=1-2", n=100, seed=1)
    assert {p.level for p in low} == {1, 2}
    assert {p.level for p in load_problems("arith:level=3", n=30)} == {3}
    assert {p.level for p in load_problems("arith:level=2-3", n=30)} == {2, 3}


def test_arith_annotations_and_golds_recomputed():
    for problem in load_problems("arith", n=600, seed=7):
        check_solution(problem)


def test_arith_level_one_is_easy():
    for problem in load_problems("arith:level=1", n=500, seed=2):
        ((expr, value),) = check_solution(problem)
        a, b = re.fullmatch(r"([0-9]+)[-+*]([0-9]+)", expr).groups()
        assert int(a) <= 40 and int(b) <= 40, expr
        assert value <= 100, expr


def test_arith_golds_never_negative_or_fractional():
    problems = [p for seed in range(5) for p in load_problems("arith", n=800, seed=seed)]
    assert len(problems) == 4000
    assert all(re.fullmatch(r"[0-9]+", p.gold) for p in problems)
    # Large results (commas matter), money, and every template family show up.
    assert any(int(p.gold) > 1000 for p in problems)
    assert any(re.search(r"[0-9],[0-9]{3}", p.question) for p in problems)
    assert any("$" in p.question for p in problems)
    assert any("/" in p.answer for p in problems)
    assert len({p.question.split(" ")[0] for p in problems}) > 10


@pytest.mark.parametrize("spec", ["arith:level=0", "arith:level=4", "arith:level=3-1", "arith:level=",
                                  "arith:levels=1", "arith:1"])
def test_bad_arith_spec(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec)) + ".*'arith:level=L-H'"):
        load_problems(spec)


def test_bad_seed_and_split():
    with pytest.raises(TypeError, match="seed"):
        load_problems("arith", seed="0")
    with pytest.raises(ValueError, match="'dev'.*'train', 'test'"):
        load_problems("arith", split="dev")


@pytest.mark.parametrize("n", [0, -3, 1.5, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match=f"n must be a positive integer or None, got {re.escape(repr(n))}"):
        load_problems("arith", n=n)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

ROWS = [
    {"question": "Q zero?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
    {"question": "Q one?", "answer": "It is $1,250.\n#### $1,250", "extra": 1},
    {"question": "Q two?", "answer": "#### -3"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def check_rows(problems: list[Problem], stem: str) -> None:
    assert [p.id for p in problems] == [f"{stem}-0", f"{stem}-1", f"{stem}-2"]
    assert [p.gold for p in problems] == ["4", "1250", "-3"]
    assert [p.question for p in problems] == ["Q zero?", "Q one?", "Q two?"]
    assert problems[1].answer == ROWS[1]["answer"]
    assert all(p.level is None for p in problems)


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mini.jsonl", ROWS)
    check_rows(load_problems(path), "mini")
    check_rows(load_problems(str(path)), "mini")
    assert load_problems(path, n=2) == load_problems(path)[:2]


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "pq.parquet", {"question": [r["question"] for r in ROWS],
                                                    "answer": [r["answer"] for r in ROWS],
                                                    "other": [1, 2, 3]})
    check_rows(load_problems(path), "pq")
    assert len(load_problems(path, n=3)) == 3


def test_missing_field_names_file_field_and_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*row 1.*\['answer'\].*\['question', 'solution'\]"):
        load_problems(path)
    ppath = write_parquet(tmp_path / "bad.parquet", {"prompt": ["q"], "answer": ["#### 1"]})
    with pytest.raises(ValueError, match=r"bad\.parquet.*\['question'\].*\['answer', 'prompt'\]"):
        load_problems(ppath)


def test_answer_without_marker_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "nomark.jsonl", [ROWS[0], ROWS[1], {"question": "q", "answer": "just 5"}])
    with pytest.raises(ValueError, match=r"nomark\.jsonl, row 2.*'####"):
        load_problems(path)


def test_n_too_large_names_both_numbers(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"n=5 .*only 3"):
        load_problems(path, n=5)


def test_bad_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2"):
        load_problems(path)


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_problems(tmp_path / "nowhere.jsonl")
    csv = tmp_path / "problems.csv"
    csv.write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown file .*problems\.csv.*\.jsonl or \.parquet"):
        load_problems(csv)
    with pytest.raises(ValueError, match=r"unknown spec 'mathqa'.*'arith'.*'gsm8k'.*\.jsonl or \.parquet"):
        load_problems("mathqa")
    with pytest.raises(TypeError, match="spec"):
        load_problems(42)


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} is not there")
def test_real_gsm8k_test_file():
    problems = load_problems(GSM8K_TEST)
    assert len(problems) == 1319
    with GSM8K_TEST.open(encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert problems[0].gold == first["answer"].split("####")[1].strip() == "18"
    assert problems[0].question == first["question"]
    assert problems[0].id == "test-0"
    assert all(re.fullmatch(r"-?[0-9]+", p.gold) for p in problems)
    with pytest.raises(ValueError, match="n=2000 .*only 1319"):
        load_problems(GSM8K_TEST, n=2000)


# --------------------------------------------------------------------------------------------------
# The hub (never reached in tests: datasets.load_dataset is replaced)
# --------------------------------------------------------------------------------------------------


def test_hub_loads_the_named_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"question": "q", "answer": "#### 1,000"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (problem,) = load_problems("gsm8k:train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert (problem.id, problem.gold) == ("gsm8k-train-0", "1000")
    load_problems("gsm8k")
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    with pytest.raises(ValueError, match="gsm8k:dev"):
        load_problems("gsm8k:dev")


def test_hub_failure_says_to_use_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"openai/gsm8k.*no network.*local GSM8K \.jsonl or \.parquet"):
        load_problems("gsm8k")


def test_hub_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install hwnoise\[rl\]"):
        load_problems("gsm8k")


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def test_prompts():
    question = "How many eggs?"
    (message,) = prompt_messages(question)
    assert message["role"] == "user"
    assert INSTRUCTION in message["content"] and message["content"].endswith(question)
    text = prompt_text(question)
    assert text.startswith(INSTRUCTION) and question in text and text.endswith("Answer:")
    assert "####" in data.INSTRUCTION
