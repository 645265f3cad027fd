"""hwnoise.rewards against an in-test re-statement of lm-eval-harness's gsm8k decision.

The reference below is written from lm-eval-harness's ``gsm8k.yaml``: two regex filters
(strict-match: ``#### (\\-?[0-9\\.\\,]+)``, first match; flexible-extract:
``(-?[$0-9.,]{2,})|(-?[0-9]+)``, last match, first non-empty group of a tuple), fallback
``[invalid]``, then ``exact_match`` with ``ignore_case`` and ``regexes_to_ignore``
``[",", "\\$", "(?s).*#### ", "\\.$"]`` applied with ``re.sub`` to prediction and reference, the
reference being ``answer.split('####')[-1].strip()``. hwnoise must agree with it everywhere except
on the listed numeric-equality cases, where lm-eval says no and hwnoise says yes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwnoise.rewards import (
    correctness_reward,
    extract_answer,
    is_correct,
    normalize_number,
)

# --------------------------------------------------------------------------------------------------
# The reference: lm-eval-harness's gsm8k filters and exact_match, re-stated
# --------------------------------------------------------------------------------------------------

LM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
LM_FALLBACK = "[invalid]"


def lm_filter(response: str, mode: str) -> str:
    regex, group_select = (LM_STRICT, 0) if mode == "strict" else (LM_FLEXIBLE, -1)
    matches = regex.findall(response)
    if not matches:
        return LM_FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else LM_FALLBACK
    return match.strip()


def lm_normalise(text: str) -> str:
    for pattern in LM_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_says(response: str, gold: str, mode: str) -> bool:
    target = gold.split("####")[-1].strip()
    return lm_normalise(lm_filter(response, mode)) == lm_normalise(target)


def numerically_equal(response: str, gold: str, mode: str) -> bool:
    """The one extension hwnoise makes: lm-eval's normalised strings equal as finite decimals."""
    try:
        a = Decimal(lm_normalise(lm_filter(response, mode)))
        b = Decimal(lm_normalise(gold.split("####")[-1].strip()))
    except InvalidOperation:
        return False
    return a.is_finite() and b.is_finite() and a == b


# --------------------------------------------------------------------------------------------------
# Hand-written completions: (case id, completion, gold)
# --------------------------------------------------------------------------------------------------

GSM8K_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                  "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18")

CASES = [
    ("plain", "The answer is 18.\n#### 18", "18"),
    ("gsm8k_solution", GSM8K_SOLUTION, GSM8K_SOLUTION),
    ("negative", "She is down 7 dollars.\n#### -7", "-7"),
    ("wrong_sign", "#### 7", "-7"),
    ("money_commas", "She pays $1,234.50 in total.\n#### $1,234.50", "1234.5"),
    ("money_commas_strict", "#### 1,234.50", "1234.50"),
    ("commas", "That is a lot.\n#### 1,000,000", "1000000"),
    ("several_numbers", "First 3 apples, then 5, total 8 apples and 2 pears.", "8"),
    ("several_numbers_last", "3 + 5 = 8", "8"),
    ("hash_twice_second", "#### 12\nWait, that is wrong.\n#### 15", "15"),
    ("hash_twice_first", "#### 12\nWait, that is wrong.\n#### 15", "12"),
    ("no_number", "I don't know.", "5"),
    ("trailing_period", "The answer is 42.", "42"),
    ("trailing_period_strict", "#### 42.", "42"),
    ("plus", "#### +5", "5"),
    ("number_inside_word", "The code abc123def is unrelated; the answer is 7 units", "7"),
    ("number_inside_word_last", "Answer: 7 apples, see item A12b", "7"),
    ("18.00", "#### 18.00", "18"),
    ("text_after", "#### 25\nI hope this helps! Have a great day.", "25"),
    ("text_after_number", "#### 25\nThat was problem 3.", "25"),
    ("lone_dot", "#### .", "18"),
    ("lone_dot_then_answer", "#### .\n#### 18", "18"),
    ("unicode_minus", "#### \u22125", "-5"),
    ("unicode_minus_positive_gold", "The temperature is \u22125 degrees", "5"),
    ("decimal_commas", "#### 1,000.50", "1000.5"),
    ("leading_dot", "#### .5", "0.5"),
    ("negative_zero", "#### -0", "0"),
    ("double_trailing_dot", "The answer is 5..", "5"),
    ("dollar_sentence", "It costs $18.", "18"),
    ("hash_no_space", "####18", "18"),
    ("hash_two_spaces", "####  18", "18"),
    ("version_number", "#### 1.2.3", "1.2"),
    ("empty", "", "0"),
    ("only_dollars", "It costs $$ a lot", "5"),
    ("ellipsis_in_number", "The answer is 18... or not", "18"),
    ("ellipsis_after", "#### 18\nHmm...", "18"),
    ("negative_money", "#### -$5", "-5"),
    ("gold_with_commas", "#### 1500", "#### 1,500"),
    ("number_in_words", "one thousand", "1000"),
    ("comma_list", "The numbers are 1,2,3", "123"),
    ("percent", "#### 50%", "50"),
    ("negative_decimal", "#### -2.50", "-2.5"),
    ("leading_zeros", "#### 0018", "18"),
    ("fullwidth_digits", "#### \uff11\uff18", "18"),
    ("arabic_indic_digits", "\u0661\u0668", "18"),
    ("arabic_indic_after", "The answer is 18 (\u0661\u0668)", "18"),
    ("big_money_flexible", "So the total is $12,345.", "12345"),
]

# Where lm-eval's string comparison says no and hwnoise's numeric comparison says yes.
NUMERIC_ONLY = {
    ("money_commas", "flexible"),          # 1234.50 vs 1234.5
    ("18.00", "strict"), ("18.00", "flexible"),
    ("decimal_commas", "strict"), ("decimal_commas", "flexible"),
    ("leading_dot", "strict"), ("leading_dot", "flexible"),    # .5 vs 0.5
    ("negative_zero", "strict"), ("negative_zero", "flexible"),
    ("double_trailing_dot", "flexible"),   # lm-eval strips one dot: "5." vs "5"
    ("negative_decimal", "strict"), ("negative_decimal", "flexible"),
    ("leading_zeros", "strict"), ("leading_zeros", "flexible"),
}

# Hand-written extractions for some of the cases: (strict, flexible).
EXPECTED_EXTRACTION = {
    "plain": ("18", "18"),
    "money_commas": (None, "1234.50"),
    "plus": (None, "5"),
    "hash_twice_first": ("12", "15"),
    "lone_dot": (None, None),
    "lone_dot_then_answer": (None, "18"),
    "unicode_minus": (None, "5"),
    "trailing_period": (None, "42"),
    "trailing_period_strict": ("42", "42"),
    "number_inside_word_last": (None, "12"),
    "negative_money": (None, "-5"),
    "18.00": ("18.00", "18.00"),
    "ellipsis_after": ("18", None),
    "no_number": (None, None),
    "comma_list": (None, "123"),
    "double_trailing_dot": (None, "5."),
    "negative": ("-7", "-7"),
    "fullwidth_digits": (None, None),
}

CASE_IDS = [case[0] for case in CASES]


def test_case_table_is_consistent():
    assert len(CASES) >= 30
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    assert {case for case, _ in NUMERIC_ONLY} <= set(CASE_IDS)
    assert set(EXPECTED_EXTRACTION) <= set(CASE_IDS)
    # The table exercises both answers: some right, some wrong, in each mode.
    for mode in ("strict", "flexible"):
        decisions = [lm_eval_says(c, g, mode) for _, c, g in CASES]
        assert 5 <= sum(decisions) <= len(CASES) - 5


@pytest.mark.parametrize("mode", ["strict", "flexible"])
@pytest.mark.parametrize(("case", "completion", "gold"), CASES, ids=CASE_IDS)
def test_is_correct_matches_lm_eval(case, completion, gold, mode):
    reference = lm_eval_says(completion, gold, mode)
    ours = is_correct(completion, gold, mode)
    if (case, mode) in NUMERIC_ONLY:
        assert reference is False, "listed as numeric-only, but lm-eval already accepts it"
        assert ours is True
    else:
        assert ours is reference


@pytest.mark.parametrize("case", sorted(EXPECTED_EXTRACTION))
def test_extract_answer_hand_written(case):
    completion = {c: text for c, text, _ in CASES}[case]
    strict, flexible = EXPECTED_EXTRACTION[case]
    assert extract_answer(completion, "strict") == strict
    assert extract_answer(completion, "flexible") == flexible


def test_extract_answer_default_mode_is_strict():
    assert extract_answer("3 apples\n#### 4\nand 5") == "4"


_TOKENS = ["#### ", "####", "-", "$", ",", ".", "+", "1", "18", "0", "5", "00", " ", "\n", "a", "x7",
           "\u2212", "1,000", ".5", "..."]
_GOLDS = ["18", "-5", "0", "5", "1000", "12.5", "0.5", "1,000", "#### 18", "x\n#### -5"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map("".join), st.sampled_from(_GOLDS),
       st.sampled_from(["strict", "flexible"]))
def test_is_correct_matches_lm_eval_on_generated_text(completion, gold, mode):
    expected = lm_eval_says(completion, gold, mode) or numerically_equal(completion, gold, mode)
    assert is_correct(completion, gold, mode) is expected


# --------------------------------------------------------------------------------------------------
# normalize_number, gold forms, chat completions, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (" $1,234.50 ", "1234.50"),
    ("18.", "18"),
    ("18..", "18."),
    ("+5", "5"),
    ("-7", "-7"),
    ("\t42\n", "42"),
    (".", None),
    ("$", None),
    ("", None),
    ("abc", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gold_as_int_and_as_full_answer():
    assert is_correct("#### 18", 18)
    assert is_correct("#### 18", "Some work <<9*2=18>>18\n#### 18")
    assert not is_correct("#### 9", "Some work <<9*2=18>>18\n#### 18")


def test_gold_without_a_number_is_an_error():
    with pytest.raises(ValueError, match="no number"):
        is_correct("#### 1", "####")


def test_chat_completion_reads_last_message():
    chat = [{"role": "assistant", "content": "I think 3.\n#### 3"}]
    assert extract_answer(chat) == "3"
    assert is_correct(chat, "3")
    two = [{"role": "assistant", "content": "#### 1"}, {"role": "assistant", "content": "#### 2"}]
    assert extract_answer(two) == "2"
    assert extract_answer([]) is None


def test_bad_completion_type():
    with pytest.raises(TypeError, match="completion"):
        extract_answer(18)
    with pytest.raises(TypeError, match="content"):
        extract_answer([{"role": "assistant"}])


@pytest.mark.parametrize("func", [
    lambda: extract_answer("#### 1", mode="loose"),
    lambda: is_correct("#### 1", "1", mode="loose"),
    lambda: correctness_reward(mode="loose"),
])
def test_bad_mode_names_it_and_the_accepted_modes(func):
    with pytest.raises(ValueError, match=r"'loose'.*'strict', 'flexible'"):
        func()


# --------------------------------------------------------------------------------------------------
# Reward functions (TRL's calling convention)
# --------------------------------------------------------------------------------------------------


def _chat(text):
    return [{"role": "assistant", "content": text}]


def test_reward_on_chat_completions_as_trl_calls_it():
    reward = correctness_reward("strict")
    assert reward.__name__ == "correctness_strict"
    completions = [_chat("#### 18"), _chat("So 18."), _chat("#### 17"), _chat("#### 1,000.00")]
    scores = reward(prompts=[[{"role": "user", "content": "q"}]] * 4, completions=completions,
                    completion_ids=[[1, 2]] * 4, gold=["18", "18", "18", "1000"],
                    question=["q"] * 4, trainer_state=None)
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert all(isinstance(s, float) for s in scores)


def test_flexible_reward_with_format_bonus():
    reward = correctness_reward("flexible", format_bonus=0.25)
    assert reward.__name__ == "correctness_flexible"
    scores = reward(prompts=["p"] * 4, completions=["#### 18", "So 18.", "#### 17", "nothing"],
                    completion_ids=None, gold=["18"] * 4)
    assert scores == [1.25, 1.0, 0.25, 0.0]


def test_reward_falls_back_to_the_answer_column():
    reward = correctness_reward()
    scores = reward(prompts=["p", "p"], completions=["#### 18", "#### 9"],
                    answer=[GSM8K_SOLUTION, GSM8K_SOLUTION])
    assert scores == [1.0, 0.0]


def test_reward_errors():
    reward = correctness_reward()
    with pytest.raises(ValueError, match=r"'gold' or 'answer'.*\['question'\]"):
        reward(prompts=["p"], completions=["#### 1"], completion_ids=[[1]], question=["q"])
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        reward(prompts=["p", "p"], completions=["#### 1", "#### 1"], gold=["1"])


@pytest.mark.parametrize("bonus", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_format_bonus(bonus):
    with pytest.raises(ValueError, match=r"format_bonus must be a finite number >= 0, got"):
        correctness_reward(format_bonus=bonus)


def test_bonus_only_if_correct_pays_the_form_only_with_the_right_number():
    reward = correctness_reward("flexible", format_bonus=0.5, bonus_only_if_correct=True)
    scores = reward(prompts=["p"] * 5, completions=["#### 18", "So 18.", "#### 17", "7 + 11 = 18\n#### 12",
                                                    "nothing"], completion_ids=None, gold=["18"] * 5)
    # '#### 17' earns nothing (a plain format bonus would pay it); the last one is flexible-wrong (12) too.
    assert scores == [1.5, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"mode": "flexible", "format_bonus": 0.0, "bonus_only_if_correct": True}, "does nothing"),
    ({"mode": "strict", "format_bonus": 0.5, "bonus_only_if_correct": True}, "only rescales"),
    ({"mode": "flexible", "format_bonus": 0.5, "bonus_only_if_correct": "yes"}, "true or false"),
])
def test_bonus_only_if_correct_refused_where_it_does_nothing(kwargs, words):
    with pytest.raises(ValueError, match=words):
        correctness_reward(**kwargs)
