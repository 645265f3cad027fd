"""Rollout-training mismatch, predicted before training: ``mismatch(model, tokenizer, rollouts)``.

- ``core``: sample under each rollout emulation, score the same tokens with the training policy,
  report per setting (``MismatchReport``, mismatch.json);
- ``stats``: the metrics (verl's ``rollout_corr`` and TRL's ``sampling/...`` names) with intervals over prompts;
- ``attribution``: which modules cause it (one module's emulation at a time) and a plan search on it;
- ``views``: the table and the PNG.
"""

from .attribution import ATTRIBUTION_FILE, attribute, module_changes, policy_samples, search_mismatch_plan
from .core import DEFAULTS, MISMATCH_FILE, MismatchReport, check_options, mismatch, parse_settings
from .sampling import SampleBatch, WeightsChanged
from .stats import METRICS

__all__ = ["ATTRIBUTION_FILE", "DEFAULTS", "METRICS", "MISMATCH_FILE", "MismatchReport", "SampleBatch",
           "WeightsChanged", "attribute", "check_options", "mismatch", "module_changes", "parse_settings",
           "policy_samples", "search_mismatch_plan"]


class _CallableModule(__import__("types").ModuleType):
    """``hn.mismatch(...)`` runs ``mismatch.core.mismatch`` while ``hn.mismatch.attribute`` and
    ``import hwnoise.mismatch`` keep reaching this package (a function of the same name would shadow it)."""

    def __call__(self, *args, **kwargs):
        return mismatch(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
