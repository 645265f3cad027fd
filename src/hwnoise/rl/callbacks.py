"""Callbacks of `hwnoise train`: periodic held-out evaluation, and stopping at a given step.

``EvalCallback`` runs ``hwnoise.evaluate`` on held-out problems every ``every`` optimizer steps and
at the last step (the weights are clean then: AQN and the rollout emulation live only inside
generation), keeps the per-problem records in ``RUN_DIR/evals/step-NNNNNN/`` (what `hwnoise report`
pairs runs on), appends ``{"step": s, "report": EvalReport.to_json()}`` to ``RUN_DIR/evals.jsonl`` and
logs ``eval/accuracy_strict``, ``eval/accuracy_flexible`` (and ``eval/<setting>/...`` for the other
settings) through TRL's metrics, so TensorBoard gets them at that step. Accuracies are in points
(percent of problems), as everywhere in hwnoise's reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

__all__ = ["EVALS_FILE", "EvalCallback", "StopAtStep", "eval_dir", "read_evals"]

EVALS_FILE = "evals.jsonl"


def eval_dir(run_dir, step: int) -> Path:
    """Where the evaluation at ``step`` keeps its per-problem records (``hwnoise.evaluate``'s ``out``)."""
    return Path(run_dir) / "evals" / f"step-{step:06d}"


def read_evals(run_dir) -> list[dict]:
    """The evaluations a run wrote so far, by step. A step evaluated twice (a resumed run) keeps its
    last evaluation; a last line cut off by a kill is ignored; any other bad line is a ValueError."""
    path = Path(run_dir) / EVALS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    by_step: dict[int, dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            by_step[int(item["step"])] = item["report"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if lineno == len(lines):
                continue
            raise ValueError(f"{path}, line {lineno}: not an evaluation record") from None
    return [{"step": step, "report": by_step[step]} for step in sorted(by_step)]


class EvalCallback(TrainerCallback):
    """Evaluate on held-out problems at ``every`` steps (0: only the last), at the end, optionally at start."""

    def __init__(self, trainer, tokenizer, problems, settings, run_dir, *, every: int = 0, at_start: bool = False,
                 batch_size: int = 8, max_new_tokens: int = 256, seed: int = 0, on_eval=None,
                 model_name: str | None = None, data_name: str | None = None):
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.problems = list(problems)
        self.settings = list(settings)
        self.run_dir = Path(run_dir)
        self.every = every
        self.at_start = at_start
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.on_eval = on_eval  # on_eval(step, report): progress display
        self.model_name, self.data_name = model_name, data_name

    def evaluate(self, step: int) -> dict:
        from ..eval import evaluate

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        aqn = getattr(self.trainer, "aqn", None)
        if aqn is not None and aqn.applied:  # cannot happen through the trainer; never evaluate noisy weights
            raise RuntimeError("AQN noise is applied at evaluation time; the rollout did not restore it")
        main = self.trainer.is_world_process_zero()
        # overwrite: a resumed run that evaluates a step again recomputes it rather than trusting old records.
        report = evaluate(model, self.tokenizer, self.problems, self.settings, batch_size=self.batch_size,
                          max_new_tokens=self.max_new_tokens, seed=self.seed,
                          out=eval_dir(self.run_dir, step) if main else None, overwrite=True,
                          model_name=self.model_name, data_name=self.data_name)
        data = report.to_json()
        if main:
            with open(self.run_dir / EVALS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "report": data}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.on_eval is not None:
            self.on_eval(step, report)
        return self._scalars(report)

    @staticmethod
    def _scalars(report) -> dict[str, float]:
        out = {}
        for setting in report.settings:
            prefix = "eval" if setting.spec == "clean" else f"eval/{setting.spec}"
            for metric in ("strict", "flexible"):
                out[f"{prefix}/accuracy_{metric}"] = float(setting.accuracy(metric))
        return out

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:
            self.trainer.log(self.evaluate(0))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        due = (self.every and step % self.every == 0) or step >= state.max_steps or control.should_training_stop
        if not due:
            return
        # Into TRL's metrics: logged with this step's other scalars (the log follows on_step_end).
        metrics = self.trainer._metrics["train"]
        for key, value in self.evaluate(step).items():
            metrics[key].append(value)


class StopAtStep(TrainerCallback):
    """Stop training after optimizer step ``step`` (saving a checkpoint there when saving is on)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True
