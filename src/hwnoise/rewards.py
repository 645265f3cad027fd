"""Answer extraction and rewards for GSM8K-style problems, with lm-eval-harness's decisions.

Two extraction modes, as lm-eval-harness's ``gsm8k`` task filters a completion:

- ``"strict"``: the FIRST match of ``#### (-?[0-9.,]+)`` (the answer line GSM8K solutions end with);
- ``"flexible"``: the LAST match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (roughly: the last number).

Both the extracted answer and the gold answer are then normalised as lm-eval's ``exact_match`` does
(every ``,`` and ``$`` removed, one trailing ``.`` removed) and compared as strings. hwnoise departs
from lm-eval in one way only: answers that are numerically equal finite decimals also count as
equal (``18.00`` and ``18``, ``1,000.50`` and ``1000.5``, ``.5`` and ``0.5``), where lm-eval's
string comparison says no. Everything lm-eval counts correct, hwnoise counts correct too.

``correctness_reward`` builds reward functions for TRL's ``GRPOTrainer``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "MODES",
    "correctness_reward",
    "extract_answer",
    "gold_answer",
    "is_correct",
    "normalize_number",
]

MODES = ("strict", "flexible")

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_DIGIT = re.compile(r"[0-9]")
# A plain finite decimal in ASCII digits: what ``Decimal`` may compare (no exponents, no NaN).
_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")

Completion = str | Sequence[dict[str, Any]]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; accepted: {', '.join(map(repr, MODES))}")


def normalize_number(text: str) -> str | None:
    """Normalise an answer string: strip whitespace, drop every ``$`` and ``,``, one trailing ``.``
    and one leading ``+``. None when no digit is left (``"."``, ``"$"``, ``""``).

    >>> normalize_number(" $1,234.50. ")
    '1234.50'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_number expects a str, got {type(text).__name__}: {text!r}")
    out = text.strip().replace("$", "").replace(",", "").strip()
    out = out.removesuffix(".").removeprefix("+")
    return out if _DIGIT.search(out) else None


def _completion_text(completion: Completion) -> str:
    """The text of a completion: a string, or the last message's content of a chat list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        if not completion:
            return ""
        last = completion[-1]
        content = last.get("content") if isinstance(last, dict) else None
        if isinstance(content, str):
            return content
        raise TypeError(f"a chat completion's last message must be a dict with a str 'content', got {last!r}")
    raise TypeError(f"a completion must be a str or a list of chat messages, got {type(completion).__name__}")


def extract_answer(completion: Completion, mode: str = "strict") -> str | None:
    """The normalised answer a completion gives, or None when it gives none.

    ``mode="strict"`` takes the first ``#### N``; ``mode="flexible"`` the last number-like run (see the
    module docstring). ``completion`` is a string or a chat list such as
    ``[{"role": "assistant", "content": "..."}]`` (the last message's content is read). A match with
    no digit left after normalisation (a lone ``.``) gives None: it can equal no gold answer.
    """
    _check_mode(mode)
    text = _completion_text(completion)
    if mode == "strict":
        matches = _STRICT.findall(text)
        match = matches[0] if matches else None
    else:
        matches = _FLEXIBLE.findall(text)
        # findall gives (group 1, group 2) tuples: exactly one group is non-empty.
        match = next(group for group in matches[-1] if group) if matches else None
    return None if match is None else normalize_number(match)


def gold_answer(gold: str | int) -> str:
    """The normalised gold answer: a bare number, or a GSM8K solution (the text after its last ``####``)."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int)):
        raise TypeError(f"gold must be a str or an int, got {type(gold).__name__}: {gold!r}")
    text = str(gold).split("####")[-1]
    normalized = normalize_number(text)
    if normalized is None:
        raise ValueError(f"gold answer {gold!r} contains no number")
    return normalized


def _as_decimal(text: str) -> Decimal | None:
    if not _DECIMAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def is_correct(completion: Completion, gold: str | int, mode: str = "strict") -> bool:
    """Whether the completion's extracted answer equals the gold answer.

    Equal means equal strings after normalisation (lm-eval's decision) or numerically equal finite
    decimals. ``gold`` is a bare number (``"18"``, ``18``) or a full GSM8K solution ending in ``#### N``.
    """
    _check_mode(mode)
    expected = gold_answer(gold)
    predicted = extract_answer(completion, mode)
    if predicted is None:
        return False
    if predicted == expected:
        return True
    a, b = _as_decimal(predicted), _as_decimal(expected)
    return a is not None and b is not None and a == b


def correctness_reward(mode: str = "strict", format_bonus: float = 0.0,
                       bonus_only_if_correct: bool = False) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer``: 1.0 per correct completion, plus ``format_bonus``
    for each completion with a strict ``#### N`` answer (correct or not; with ``bonus_only_if_correct``,
    only when that line's number is right: a bonus for the form alone is learned first, and a small model
    then writes ``#### <a number from the question>``).

    The function is named ``correctness_<mode>`` (TRL logs rewards by function name) and is called as
    ``func(prompts=..., completions=..., completion_ids=..., **dataset_columns)``; it reads the
    ``gold`` column, or ``answer`` (a GSM8K solution) when there is no ``gold`` column.
    """
    _check_mode(mode)
    is_number = isinstance(format_bonus, (int, float)) and not isinstance(format_bonus, bool)
    if not (is_number and math.isfinite(format_bonus) and format_bonus >= 0):
        raise ValueError(f"format_bonus must be a finite number >= 0, got {format_bonus!r}")
    bonus = float(format_bonus)
    if not isinstance(bonus_only_if_correct, bool):
        raise ValueError(f"bonus_only_if_correct must be true or false, got {bonus_only_if_correct!r}")
    if bonus_only_if_correct and not bonus:
        raise ValueError("bonus_only_if_correct=True does nothing without a format_bonus > 0")
    if bonus_only_if_correct and mode == "strict":
        raise ValueError("bonus_only_if_correct=True with mode 'strict' only rescales the reward (a strict-correct "
                         "answer always has the '#### N' line); accepted: mode 'flexible', or "
                         "bonus_only_if_correct=False")

    def reward(completions: Sequence[Completion], **columns: Any) -> list[float]:
        golds = columns.get("gold")
        if golds is None:
            golds = columns.get("answer")
        if golds is None:
            present = sorted(k for k in columns if k not in ("prompts", "completion_ids"))
            raise ValueError(
                f"{reward.__name__}: the dataset needs a 'gold' or 'answer' column; columns passed: {present}")
        if len(golds) != len(completions):
            raise ValueError(
                f"{reward.__name__}: {len(completions)} completions but {len(golds)} gold answers")
        scores = []
        for completion, gold in zip(completions, golds):
            score = 1.0 if is_correct(completion, gold, mode) else 0.0
            if bonus_only_if_correct:
                if is_correct(completion, gold, "strict"):
                    score += bonus
            elif bonus and extract_answer(completion, "strict") is not None:
                score += bonus
            scores.append(score)
        return scores

    reward.__name__ = reward.__qualname__ = f"correctness_{mode}"
    return reward
