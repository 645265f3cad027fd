"""Problems for evaluation and RL: a seeded arithmetic generator, and GSM8K from files or the hub.

``load_problems(spec, n=None, seed=0, split="test")`` accepts:

- ``"arith"``, ``"arith:level=1"``, ``"arith:level=1-2"``: word problems of one to three arithmetic
  steps (the level), written here, with GSM8K-style solutions. Level 1 is one small addition,
  subtraction or multiplication. Without a level, levels 1-3 take turns (each block of three
  problems holds one of each, in a seeded order). Deterministic for (seed, split): the ``"train"``
  split draws from a stream of its own, so training and evaluation problems come from different
  streams. Golds are never negative and never fractional. ``n=None`` means 256 problems. Ids are
  ``arith-<seed>-<index>`` (``arith-l1-…``, ``arith-l1to2-…`` for a level range; ``…-train-<seed>-…``
  for the train split).
- a path to a GSM8K-format ``.jsonl`` or ``.parquet`` file (fields ``question`` and ``answer``, the
  answer ending in ``#### N``); ids are ``<file stem>-<row index>``.
- ``"gsm8k"`` / ``"gsm8k:train"`` / ``"gsm8k:test"``: ``openai/gsm8k`` (config ``main``) from the
  Hugging Face hub, which needs ``datasets`` and a network.

``n`` keeps the first ``n`` problems (file order; the generator's order for arith).

``INSTRUCTION``, ``prompt_messages`` and ``prompt_text`` build the prompts evaluation and RL share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .rewards import normalize_number

__all__ = [
    "ARITH_DEFAULT_N",
    "INSTRUCTION",
    "Problem",
    "load_problems",
    "prompt_messages",
    "prompt_text",
]

ARITH_DEFAULT_N = 256
SPLITS = ("train", "test")
ACCEPTED_SPECS = ("'arith'", "'arith:level=1'", "'arith:level=1-2'", "'gsm8k'", "'gsm8k:train'",
                  "a path to a .jsonl or .parquet file")
REQUIRED_FIELDS = ("question", "answer")

INSTRUCTION = "Solve the math problem step by step. End your answer with a line '#### <number>'."


@dataclass(frozen=True)
class Problem:
    """One problem: ``answer`` is the full solution ending in ``#### N``; ``gold`` is N normalised
    (``hwnoise.rewards.normalize_number``); ``level`` is the number of steps for generated problems."""

    id: str
    question: str
    answer: str
    gold: str
    level: int | None = None

    def to_dict(self) -> dict:
        """The fields as a plain dict (for ``datasets.Dataset.from_list`` and JSON reports)."""
        return dataclasses.asdict(self)


def prompt_messages(question: str) -> list[dict]:
    """The chat prompt for a question: one user message holding the instruction and the question."""
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}]


def prompt_text(question: str) -> str:
    """The plain-text prompt for tokenizers without a chat template, ending in the cue ``Answer:``."""
    return f"{INSTRUCTION}\n\nQuestion: {question}\nAnswer:"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_problems(spec: str | os.PathLike, n: int | None = None, seed: int = 0,
                  split: str = "test") -> list[Problem]:
    """Load or generate problems; see the module docstring for ``spec``.

    ``n`` keeps the first ``n`` (``None``: all of a file or hub split, 256 generated problems);
    ``seed`` drives the arith generator; ``split`` (``"test"`` or ``"train"``) picks the arith stream
    or the hub split (``"gsm8k:train"`` overrides it) and does not apply to files.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(map(repr, SPLITS))}")
    if isinstance(spec, str) and (spec == "arith" or spec.startswith("arith:")):
        return _arith(_parse_levels(spec), ARITH_DEFAULT_N if n is None else n, seed, split)
    if isinstance(spec, str) and (spec == "gsm8k" or spec.startswith("gsm8k:")):
        hub_split = spec.partition(":")[2] or split
        if hub_split not in SPLITS:
            raise ValueError(f"unknown GSM8K split in {spec!r}; accepted: 'gsm8k:train', 'gsm8k:test'")
        return _take(_hub_gsm8k(hub_split), n, spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a str or a path, got {type(spec).__name__}: {spec!r}")
    path = Path(spec)
    readers = {".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if path.suffix not in readers:
        what = "file" if path.exists() else "spec"
        raise ValueError(f"unknown {what} {str(spec)!r}; accepted: {', '.join(ACCEPTED_SPECS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such problem file: {str(path)!r}")
    rows = readers[path.suffix](path)
    return _take([_problem(f"{path.stem}-{i}", row, f"{path}, row {i}") for i, row in enumerate(rows)],
                 n, str(path))


def _take(problems: list[Problem], n: int | None, source: str) -> list[Problem]:
    if n is None:
        return problems
    if n > len(problems):
        raise ValueError(f"n={n} problems requested but {source!r} holds only {len(problems)}")
    return problems[:n]


def _problem(pid: str, row: dict, where: str, level: int | None = None) -> Problem:
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError(f"{where}: 'question' and 'answer' must be strings, got "
                         f"{type(question).__name__} and {type(answer).__name__}")
    if "####" not in answer:
        raise ValueError(f"{where}: the answer has no '#### <number>' line: {answer[-80:]!r}")
    gold = normalize_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"{where}: no number after '####' in the answer: {answer[-80:]!r}")
    return Problem(id=pid, question=question, answer=answer, gold=gold, level=level)


def _check_fields(path: Path, present: list[str], where: str) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in present]
    if missing:
        raise ValueError(f"{path}: {where} lacks field(s) {missing}; fields present: {sorted(present)}; "
                         f"GSM8K format needs {list(REQUIRED_FIELDS)}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise TypeError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            _check_fields(path, list(row), f"row {len(rows)} (line {lineno})")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or hwnoise[rl])") from exc
    table = pq.read_table(path)
    _check_fields(path, table.column_names, "the table")
    return table.select(list(REQUIRED_FIELDS)).to_pylist()


def _hub_gsm8k(split: str) -> list[Problem]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading 'gsm8k' from the hub needs the datasets package: pip install hwnoise[rl] "
                          "(or pass a local GSM8K .jsonl/.parquet path)") from exc
    try:
        dataset = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as exc:  # offline, hub down, auth: all mean "use a local file"
        raise RuntimeError(f"could not load openai/gsm8k ({split}) from the Hugging Face hub "
                           f"({type(exc).__name__}: {exc}); pass a local GSM8K .jsonl or .parquet path "
                           f"instead, e.g. load_problems('data/gsm8k/{split}.jsonl')") from exc
    return [_problem(f"gsm8k-{split}-{i}", row, f"openai/gsm8k {split}, row {i}")
            for i, row in enumerate(dataset)]


# --------------------------------------------------------------------------------------------------
# The arithmetic generator
# --------------------------------------------------------------------------------------------------

LEVELS = (1, 2, 3)
_LEVEL_SPEC = re.compile(r"arith:level=([0-9]+)(?:-([0-9]+))?")


def _parse_levels(spec: str) -> tuple[int, ...]:
    if spec == "arith":
        return LEVELS
    match = _LEVEL_SPEC.fullmatch(spec)
    lo, hi = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not (match and 1 <= lo <= hi <= 3):
        raise ValueError(f"bad arith spec {spec!r}; accepted: 'arith', 'arith:level=L' or 'arith:level=L-H' "
                         f"with 1 <= L <= H <= 3")
    return tuple(range(lo, hi + 1))


def _arith(levels: tuple[int, ...], n: int, seed: int, split: str) -> list[Problem]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    rng = random.Random(f"hwnoise-arith:{split}:{seed}")
    # Ids: arith-<seed>-<index>, with the levels and the train split named when they are not the default.
    tag = "arith" if levels == LEVELS else f"arith-l{levels[0]}" + (f"to{levels[-1]}" if len(levels) > 1 else "")
    prefix = f"{tag}-{seed}" if split == "test" else f"{tag}-train-{seed}"
    problems: list[Problem] = []
    while len(problems) < n:
        block = list(levels)
        rng.shuffle(block)
        for level in block[: n - len(problems)]:
            question, answer = rng.choice(_TEMPLATES[level])(rng)
            row = {"question": question, "answer": answer}
            problems.append(_problem(f"{prefix}-{len(problems)}", row, "arith generator", level))
    return problems


def _num(x: int) -> str:
    """An integer as a question states it: with thousands separators."""
    return f"{x:,}"


class _Work:
    """A GSM8K-style worked solution, one calculator-annotated step per line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, sentence: str, a: int, op: str, b: int, money: str = "") -> int:
        """Compute ``a op b`` exactly, write ``sentence`` with ``{}`` replaced by the worked calculation
        (``3 * 4 = <<3*4=12>>12``) and return the result. ``money`` names the dollar amounts among
        ``a``, ``b`` and the result ``=`` (``"b="``: ``3 * $4 = $<<3*4=12>>12``)."""
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value, remainder = divmod(a, b)
            if remainder:
                raise AssertionError(f"inexact division {a}/{b} in a template")
        if value < 0:
            raise AssertionError(f"negative result {a}{op}{b} in a template")
        da, db, dv = ("$" if part in money else "" for part in "ab=")
        self.lines.append(sentence.format(f"{da}{a} {op} {db}{b} = {dv}<<{a}{op}{b}={value}>>{value}"))
        return value

    def answer(self, result: int) -> str:
        return "\n".join([*self.lines, f"#### {result}"])


_PEOPLE = (("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
           ("Sofia", "she", "her"), ("Omar", "he", "his"), ("Priya", "she", "her"), ("Chen", "he", "his"),
           ("Lucas", "he", "his"), ("Emma", "she", "her"), ("Zara", "she", "her"), ("Diego", "he", "his"),
           ("Hana", "she", "her"), ("Tom", "he", "his"), ("Grace", "she", "her"), ("Ravi", "he", "his"))
_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "stamps", "books",
           "oranges", "beads", "toy cars")
# (singular, plural, lowest price, highest price) in dollars.
_ITEMS = (("notebook", "notebooks", 2, 9), ("pen", "pens", 1, 5), ("sandwich", "sandwiches", 4, 12),
          ("ticket", "tickets", 5, 25), ("toy", "toys", 3, 20), ("shirt", "shirts", 8, 30),
          ("plant", "plants", 4, 18), ("game", "games", 10, 60), ("cake", "cakes", 6, 25))
_GOODS = ("bottles", "bricks", "chairs", "light bulbs", "jars of jam", "boxes of tea", "bolts")
_CONTAINERS = ("boxes", "bags", "baskets", "jars", "crates", "packs")


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_PEOPLE)


def _item(rng: random.Random) -> tuple[str, str, int]:
    singular, plural, lo, hi = rng.choice(_ITEMS)
    return singular, plural, rng.randint(lo, hi)


# Level 1: one small addition, subtraction or multiplication.

def _l1_gift(rng: random.Random) -> tuple[str, str]:
    (name, _, _), (other, _, _) = rng.sample(_PEOPLE, 2)
    thing, a, b = rng.choice(_THINGS), rng.randint(2, 20), rng.randint(2, 15)
    w = _Work()
    total = w.step(f"{name} has {{}} {thing} now.", a, "+", b)
    question = (f"{name} has {a} {thing}. {other} gives {name} {b} more {thing}. "
                f"How many {thing} does {name} have now?")
    return question, w.answer(total)


def _l1_give_away(rng: random.Random) -> tuple[str, str]:
    (name, subj, _), (other, _, _) = rng.sample(_PEOPLE, 2)
    thing, a = rng.choice(_THINGS), rng.randint(6, 30)
    b = rng.randint(1, a - 1)
    w = _Work()
    left = w.step(f"{name} has {{}} {thing} left.", a, "-", b)
    question = (f"{name} had {a} {thing}. {subj.capitalize()} gave {b} of them to {other}. "
                f"How many {thing} does {name} have left?")
    return question, w.answer(left)


def _l1_groups(rng: random.Random) -> tuple[str, str]:
    thing, box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 10)
    w = _Work()
    total = w.step(f"There are {{}} {thing} in total.", a, "*", b)
    question = (f"There are {a} {box} with {b} {thing} in each. How many {thing} are there in total?")
    return question, w.answer(total)


def _l1_two_prices(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    (one, _, lo1, hi1), (two, _, lo2, hi2) = rng.sample(_ITEMS, 2)
    a, b = rng.randint(lo1, min(hi1, 20)), rng.randint(lo2, min(hi2, 20))
    w = _Work()
    total = w.step(f"{name} spends {{}} in total.", a, "+", b, money="ab=")
    question = (f"{name} buys a {one} for ${a} and a {two} for ${b}. "
                f"How many dollars does {subj} spend in total?")
    return question, w.answer(total)


def _l1_spend(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    one, _, _ = _item(rng)
    a = rng.randint(10, 40)
    b = rng.randint(1, a - 1)
    w = _Work()
    left = w.step(f"{name} has {{}} left.", a, "-", b, money="ab=")
    question = (f"{name} has ${a}. {subj.capitalize()} spends ${b} on a {one}. "
                f"How many dollars does {name} have left?")
    return question, w.answer(left)


def _l1_unit_price(rng: random.Random) -> tuple[str, str]:
    name, _, _ = _person(rng)
    one, many, price = _item(rng)
    count, price = rng.randint(2, 6), min(price, 10)
    w = _Work()
    cost = w.step(f"The {many} cost {{}}.", price, "*", count, money="a=")
    question = (f"One {one} costs ${price}. {name} buys {count} {many}. How many dollars does {name} pay?")
    return question, w.answer(cost)


# Level 2: two steps.

def _l2_change(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    _, many, price = _item(rng)
    count = rng.randint(2, 6)
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > price * count)
    w = _Work()
    cost = w.step(f"The {many} cost {{}}.", count, "*", price, money="b=")
    change = w.step(f"{name} gets {{}} in change.", bill, "-", cost, money="ab=")
    question = (f"{name} buys {count} {many} at ${price} each and pays with a ${bill} bill. "
                f"How many dollars of change does {subj} get?")
    return question, w.answer(change)


def _l2_share(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    thing, friends = rng.choice(_THINGS), rng.randint(2, 8)
    total = friends * rng.randint(2, 12)
    bought = rng.randint(1, total - 1)
    have = total - bought
    w = _Work()
    w.step(f"{name} has {{}} {thing}.", have, "+", bought)
    each = w.step(f"Each friend gets {{}} {thing}.", total, "/", friends)
    question = (f"{name} has {have} {thing} and buys {bought} more. {subj.capitalize()} shares all of them "
                f"equally among {friends} friends. How many {thing} does each friend get?")
    return question, w.answer(each)


def _l2_factory(rng: random.Random) -> tuple[str, str]:
    goods, per_day, days = rng.choice(_GOODS), rng.randint(120, 2500), rng.randint(2, 30)
    made = per_day * days
    broken = rng.randint(1, max(1, made // 20))
    w = _Work()
    made = w.step(f"The factory makes {{}} {goods}.", per_day, "*", days)
    good = w.step("{} of them can be sold.", made, "-", broken)
    question = (f"A factory makes {_num(per_day)} {goods} a day. After {days} days, {_num(broken)} of them "
                f"are broken. How many {goods} can be sold?")
    return question, w.answer(good)


def _l2_give_twice(rng: random.Random) -> tuple[str, str]:
    (name, subj, _), (first, _, _), (second, _, _) = rng.sample(_PEOPLE, 3)
    thing, a = rng.choice(_THINGS), rng.randint(20, 90)
    b = rng.randint(1, a // 2)
    c = rng.randint(1, a - b - 1)
    w = _Work()
    after = w.step(f"After giving some to {first}, {name} has {{}} {thing}.", a, "-", b)
    left = w.step(f"After giving some to {second}, {subj} has {{}} {thing} left.", after, "-", c)
    question = (f"{name} had {a} {thing}. {subj.capitalize()} gave {b} to {first} and then {c} to {second}. "
                f"How many {thing} does {name} have left?")
    return question, w.answer(left)


def _l2_savings(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    one, _, _ = _item(rng)
    weekly, weeks = rng.randint(5, 60), rng.randint(3, 20)
    saved_total = weekly * weeks
    price = rng.randint(1, saved_total - 1)
    w = _Work()
    saved = w.step(f"{name} saves {{}}.", weekly, "*", weeks, money="a=")
    left = w.step(f"{subj.capitalize()} has {{}} left.", saved, "-", price, money="ab=")
    question = (f"{name} saves ${weekly} every week for {weeks} weeks. Then {subj} spends ${_num(price)} on a "
                f"{one}. How many dollars does {name} have left?")
    return question, w.answer(left)


def _l2_split_then_eat(rng: random.Random) -> tuple[str, str]:
    thing, kids = rng.choice(_THINGS), rng.randint(2, 9)
    each = rng.randint(3, 15)
    eaten = rng.randint(1, each - 1)
    w = _Work()
    got = w.step(f"Each child gets {{}} {thing}.", kids * each, "/", kids)
    left = w.step(f"Each child has {{}} {thing} left.", got, "-", eaten)
    question = (f"{kids * each} {thing} are shared equally among {kids} children. Each child then gives away "
                f"{eaten} of them. How many {thing} does each child have left?")
    return question, w.answer(left)


# Level 3: three steps.

def _l3_two_items(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    (_, many1, lo1, hi1), (_, many2, lo2, hi2) = rng.sample(_ITEMS, 2)
    p1, p2 = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    c1, c2 = rng.randint(2, 12), rng.randint(2, 12)
    w = _Work()
    cost1 = w.step(f"The {many1} cost {{}}.", c1, "*", p1, money="b=")
    cost2 = w.step(f"The {many2} cost {{}}.", c2, "*", p2, money="b=")
    total = w.step(f"{name} spends {{}} in total.", cost1, "+", cost2, money="ab=")
    question = (f"{name} buys {c1} {many1} at ${p1} each and {c2} {many2} at ${p2} each. "
                f"How many dollars does {subj} spend in total?")
    return question, w.answer(total)


def _l3_eggs(rng: random.Random) -> tuple[str, str]:
    name, subj, _ = _person(rng)
    laid = rng.randint(8, 40)
    used = rng.randint(1, laid - 2)
    price, days = rng.randint(2, 6), rng.randint(3, 30)
    w = _Work()
    sold = w.step(f"{name} sells {{}} eggs a day.", laid, "-", used)
    daily = w.step(f"{subj.capitalize()} earns {{}} a day.", sold, "*", price, money="b=")
    total = w.step(f"In {days} days {subj} earns {{}}.", daily, "*", days, money="a=")
    question = (f"{name}'s hens lay {laid} eggs a day. {subj.capitalize()} uses {used} of them every day and "
                f"sells the rest for ${price} each. How many dollars does {subj} earn from eggs in {days} days?")
    return question, w.answer(total)


def _l3_jars(rng: random.Random) -> tuple[str, str]:
    name, subj, poss = _person(rng)
    wage, hours, jars = rng.randint(8, 30), rng.randint(4, 40), rng.randint(2, 5)
    earned = wage * hours
    per_jar = rng.randint(1, (earned - 1) // jars)
    spent = earned - per_jar * jars
    w = _Work()
    earned = w.step(f"{name} earns {{}}.", wage, "*", hours, money="a=")
    rest = w.step(f"{subj.capitalize()} has {{}} left to put away.", earned, "-", spent, money="ab=")
    each = w.step("Each jar gets {}.", rest, "/", jars, money="a=")
    question = (f"{name} earns ${wage} an hour and works {hours} hours. {subj.capitalize()} spends ${_num(spent)} "
                f"and splits the rest equally among {poss} {jars} savings jars. How many dollars go into each jar?")
    return question, w.answer(each)


def _l3_library(rng: random.Random) -> tuple[str, str]:
    books = rng.randint(800, 9000)
    monday = rng.randint(20, books // 3)
    tuesday = rng.randint(20, books // 3)
    back = rng.randint(10, monday + tuesday)
    w = _Work()
    after_monday = w.step("After Monday the library has {} books.", books, "-", monday)
    after_tuesday = w.step("After Tuesday it has {} books.", after_monday, "-", tuesday)
    now = w.step("Now it has {} books.", after_tuesday, "+", back)
    question = (f"A library has {_num(books)} books. It lends out {monday} books on Monday and {tuesday} books "
                f"on Tuesday, and {back} books are returned on Wednesday. How many books are in the library now?")
    return question, w.answer(now)


def _l3_buses(rng: random.Random) -> tuple[str, str]:
    classes, size = rng.randint(3, 12), rng.randint(15, 30)
    seats = rng.choice((10, 20, 25, 40, 50))
    students = classes * size
    buses = students // seats + rng.randint(1, 3)
    adults = buses * seats - students
    w = _Work()
    students = w.step("There are {} students.", classes, "*", size)
    people = w.step("With the adults, {} people go on the trip.", students, "+", adults)
    used = w.step("They fill {} buses.", people, "/", seats)
    question = (f"A school has {classes} classes of {size} students. All the students and {adults} adults go "
                f"on a trip in buses with {seats} seats each, and every bus is full. How many buses do they use?")
    return question, w.answer(used)


def _l3_warehouse(rng: random.Random) -> tuple[str, str]:
    goods, rows, shelves, per_shelf = (rng.choice(_GOODS), rng.randint(3, 20), rng.randint(4, 12),
                                       rng.randint(10, 60))
    stored = rows * shelves * per_shelf
    shipped = rng.randint(1, stored - 1)
    w = _Work()
    shelves_total = w.step("The warehouse has {} shelves.", rows, "*", shelves)
    stored = w.step(f"It holds {{}} {goods}.", shelves_total, "*", per_shelf)
    left = w.step(f"{{}} {goods} are left.", stored, "-", shipped)
    question = (f"A warehouse has {rows} rows of shelves, with {shelves} shelves in each row and {per_shelf} "
                f"{goods} on each shelf. {_num(shipped)} {goods} are shipped out. How many {goods} are left?")
    return question, w.answer(left)


_TEMPLATES: dict[int, tuple[Callable[[random.Random], tuple[str, str]], ...]] = {
    1: (_l1_gift, _l1_give_away, _l1_groups, _l1_two_prices, _l1_spend, _l1_unit_price),
    2: (_l2_change, _l2_share, _l2_factory, _l2_give_twice, _l2_savings, _l2_split_then_eat),
    3: (_l3_two_items, _l3_eggs, _l3_jars, _l3_library, _l3_buses, _l3_warehouse),
}
