"""hwnoise inside lm-evaluation-harness (extra ``hwnoise[lm-eval]``, lm-eval 0.4.13).

- ``EmulatedHFLM`` (registered with lm-eval as ``hwnoise-hf``): lm-eval's ``hf`` model with every
  forward and generation under an emulation spec; any task, loglikelihood and generation alike.
- ``plan_lm_eval`` / ``run_pairs`` / ``build_report``: each task clean and under each setting on the
  same documents, lm-eval's samples kept, paired statistics as ``hwnoise eval`` gives them; resumable.
  ``hwnoise lm-eval`` is the command.
- ``gsm8k_task_yaml`` / ``write_gsm8k_task``: lm-eval's gsm8k task on a local file (``gsm8k_local``).

lm-eval's own CLI has no plug-in discovery (its model names are a fixed table), so the registered
class is reached from Python (``lm_eval.simple_evaluate(model=EmulatedHFLM(...))``, or
``model="hwnoise-hf"`` once this module is imported) or through ``hwnoise lm-eval``. See docs/lm-eval.md.
"""

from .model import REGISTERED_NAME, EmulatedHFLM, content_key, split_emulation
from .report import build_report, per_document_values, save_report, table
from .run import LmEvalPlan, Pair, plan_lm_eval, read_samples, run_pairs, setting_slug
from .tasks import GSM8K_ENV, GSM8K_TASK, gsm8k_task_yaml, resolve_gsm8k_path, write_gsm8k_task

__all__ = [
    "GSM8K_ENV", "GSM8K_TASK", "REGISTERED_NAME", "EmulatedHFLM", "LmEvalPlan", "Pair", "build_report", "content_key",
    "gsm8k_task_yaml", "per_document_values", "plan_lm_eval", "read_samples", "resolve_gsm8k_path", "run_pairs",
    "save_report", "setting_slug", "split_emulation", "table", "write_gsm8k_task",
]
