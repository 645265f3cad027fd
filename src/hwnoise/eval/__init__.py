"""Robustness evaluation: accuracy clean and under each hardware setting, with honest statistics.

``evaluate(model, tokenizer, problems, settings)`` runs the same problems clean and under each
``Emulation`` (greedy, batched, resumable from a per-problem JSONL) and returns an ``EvalReport``:
accuracy (strict and flexible) with 95 % Wilson intervals; per setting against clean the paired drop
with a bootstrap interval, the exact McNemar p-value and the robustness class, stated only when the
interval supports it. See ``core`` (evaluate, resume), ``generate`` (batched greedy generation),
``stats`` (the statistics, from scipy) and ``report`` (EvalReport).
"""

from .core import (
    EVAL_RUN_FILE,
    RECORDS_FILE,
    check_problems,
    evaluate,
    parse_settings,
    read_records,
)
from .generate import build_prompts, generate_greedy
from .report import ANSWER_METRICS, EvalReport, SettingResult
from .stats import (
    Comparison,
    compare,
    exact_conditional_interval,
    mcnemar_exact,
    n_needed,
    paired_bootstrap,
    robustness_class,
    wilson_interval,
)

__all__ = [
    "ANSWER_METRICS", "EVAL_RUN_FILE", "RECORDS_FILE", "Comparison", "EvalReport", "SettingResult", "build_prompts",
    "check_problems", "compare", "evaluate", "exact_conditional_interval", "generate_greedy", "mcnemar_exact", "n_needed", "paired_bootstrap",
    "parse_settings", "read_records", "robustness_class", "wilson_interval",
]

