"""``evaluate``: the same problems clean and under each setting, recorded per problem, resumable.

Problems are cut into fixed batches (the order of ``problems``, ``batch_size`` per batch) and each
batch of each setting runs inside ``setting.applied(model, seed=seed, step=batch_index)``: a batch's
noise depends on (seed, batch index) and its own prompts, never on what ran before it. So a run that
was killed can resume exactly: with ``out=DIR``, every problem's record is appended (and flushed) to
``DIR/records.jsonl`` when its batch finishes, and a rerun skips the batches whose problems are all
recorded, recomputes a partly recorded batch and appends only the missing records. ``DIR/run.json``
holds what the records depend on (model, settings, seed, batch size, token limit, problems, hwnoise
version); a rerun whose header differs is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..devices import place
from ..emulation import Emulation
from ..identity import DEFAULT_ENGINE, IDENTITY_KEYS, identity_differences, run_identity
from ..io import atomic_write_json, check_outputs, is_hwnoise_png, json_with_keys, jsonl_with_keys, prepare_out_dir
from ..plans import WeightPlan, is_plan_spec
from ..rewards import extract_answer, is_correct
from .generate import build_prompts
from .report import ANSWER_METRICS, EvalReport, SettingResult

__all__ = ["EVAL_OUTPUTS", "EVAL_RUN_FILE", "RECORDS_FILE", "EvalProblem", "check_problems", "check_settings", "evaluate", "parse_settings", "read_records"]

EVAL_RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
# What `hwnoise eval` / ``evaluate(out=...)`` write into their folder, each with the test that tells
# an earlier evaluation's file (hwnoise.io.check_outputs): anything else of these names is refused.
EVAL_OUTPUTS = {
    "eval.json": json_with_keys("settings", "comparisons", "max_new_tokens"),
    "eval.png": is_hwnoise_png,
    RECORDS_FILE: jsonl_with_keys("setting", "problem_id"),
    EVAL_RUN_FILE: json_with_keys("settings", "problems_sha256"),
}
REQUIRED_FIELDS = ("id", "question", "gold")
# The run's identity (hwnoise.identity: model, settings, plan contents, dtype, device, engine) and what
# else the records depend on; a rerun must match every one of them to reuse a record.
HEADER_FIELDS = (*IDENTITY_KEYS, "seed", "batch_size", "max_new_tokens", "problems", "problems_sha256",
                 "hwnoise_version")


@dataclass(frozen=True)
class EvalProblem:
    """What evaluation needs of a problem (``hwnoise.data.Problem`` or a mapping with these fields)."""

    id: str
    question: str
    gold: str


def check_problems(problems, n: int | None = None) -> list[EvalProblem]:
    """The first ``n`` problems (all when None) as ``EvalProblem``s; ValueError naming what is wrong."""
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence):
        raise TypeError(f"problems must be a list of problems (hwnoise.data.load_problems); got {type(problems).__name__}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if not problems:
        raise ValueError("no problems to evaluate")
    if n is not None and n > len(problems):
        raise ValueError(f"n={n} is larger than the data: only {len(problems)} problems were given")
    out, seen = [], set()
    for i, p in enumerate(problems[:n] if n is not None else problems):
        get = p.get if isinstance(p, Mapping) else lambda name, p=p: getattr(p, name, None)
        values = {name: get(name) for name in REQUIRED_FIELDS}
        missing = [name for name, v in values.items() if v is None]
        if missing:
            raise ValueError(f"problem {i} lacks field(s) {missing}; evaluation needs {list(REQUIRED_FIELDS)} "
                             f"(hwnoise.data.load_problems gives them)")
        pid, question, gold = str(values["id"]), values["question"], str(values["gold"])
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"problem {pid!r}: question must be a non-empty string; got {question!r}")
        if pid in seen:
            raise ValueError(f"duplicate problem id {pid!r}: every problem needs its own id")
        seen.add(pid)
        out.append(EvalProblem(pid, question, gold))
    return out


def parse_settings(settings) -> list:
    """``Emulation``s from specs or Emulations, duplicates dropped, clean first (added if missing)."""
    if isinstance(settings, (str, Emulation)):
        settings = [settings]
    if settings is None:
        settings = []
    out: dict[str, Emulation] = {"clean": Emulation()}
    for s in settings:
        e = Emulation.parse(s)  # ValueError naming the bad spec and the accepted forms
        out.setdefault(e.spec, e)
    return list(out.values())


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _problems_hash(problems: list[EvalProblem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.gold]).encode())
    return h.hexdigest()


def _model_name(model, model_name: str | None) -> str:
    if model_name:
        return str(model_name)
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", None) or type(model).__name__)


def _header(model_name, settings, seed, batch_size, max_new_tokens, problems, *, dtype: str = "fp32",
            device: str = "cpu", engine: str = DEFAULT_ENGINE) -> dict:
    from .. import __version__  # the top-level package defines it (a module-level import would be circular)

    return {**run_identity(model_name, settings, dtype=dtype, device=device, engine=engine), "seed": seed,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "problems": len(problems),
            "problems_sha256": _problems_hash(problems), "hwnoise_version": __version__}


def check_settings(model, settings, seed: int = 0) -> None:
    """Resolve every setting against ``model`` before anything is generated: each is applied once
    (and undone at once), so a target, layer range, exclude or plan that does not fit this model is
    a ValueError naming the setting, before the first (clean) completion rather than after it.
    ``model`` may be a meta-device build (``hwnoise.models.meta_model``): then the selections are
    checked before any weight is read.

    Args:
        model: the loaded model the settings will run on.
        settings: ``Emulation``s or spec strings.
        seed: the evaluation's seed (the noise drawn here is thrown away with the block).

    Example:
        >>> from tests._scan_models import tiny_llama  # doctest: +SKIP
        >>> check_settings(tiny_llama(), ["weights:mxfp4+targets:layers.99"])  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: setting 'weights:mxfp4+targets:layers.99' does not fit this model: layers [99] ...
    """
    import torch

    on_meta = any(p.device.type == "meta" for p in model.parameters())
    for setting in parse_settings(settings):
        if setting.is_clean:
            continue
        _check_plan_modules(model, setting)
        try:
            with torch.no_grad(), setting.applied(model, seed=seed, step=0):
                pass
        except ValueError as err:
            raise ValueError(f"setting {setting.spec!r} does not fit this model: {err}") from None
        except (RuntimeError, NotImplementedError):
            if not on_meta:
                raise
            # A meta model (``hwnoise.models.meta_model``) has shapes, no numbers: every module was
            # selected when the numerics (quantizing a weight) failed; the loaded model checks those.


def _check_plan_modules(model, setting: Emulation) -> None:
    """A plan entry for a module without a weight of its own (a decoder layer, an attention block)
    would quantize nothing there: refused, naming the entries and what a plan names."""
    import torch

    for value in (getattr(setting, "weight_format", None), getattr(setting, "input_format", None)):
        if value is None or not is_plan_spec(value):
            continue
        plan = WeightPlan.coerce(value)
        modules = dict(model.named_modules())
        weightless = [name for name, _ in plan.formats
                      if name in modules and not isinstance(modules[name]._parameters.get("weight"), torch.Tensor)]
        if weightless:
            raise ValueError(f"setting {setting.spec!r}: the plan names {', '.join(weightless[:5])}"
                             f"{' ...' if len(weightless) > 5 else ''}, a module without a weight of its own "
                             "(a decoder layer or block?); a plan names linear modules, e.g. "
                             "model.layers.0.mlp.down_proj (as `hwnoise scan --plan` writes it)")


def _prepare_dir(out: Path, header: dict, overwrite: bool) -> None:
    """Write the header, or check that the one there matches; clear the directory's results on overwrite."""
    run, records = out / EVAL_RUN_FILE, out / RECORDS_FILE
    if overwrite:
        for name in (RECORDS_FILE, EVAL_RUN_FILE, "eval.json", "eval.png"):
            (out / name).unlink(missing_ok=True)
    if run.exists():
        try:
            old = json.loads(run.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{run} is not a run header ({exc}); use a new --out or --overwrite") from None
        differ = identity_differences(old, header, HEADER_FIELDS)
        if differ:
            detail = "; ".join(differ)
            raise ValueError(f"{out} holds a different run ({detail}); it cannot be resumed with these options: "
                             f"use a new --out or --overwrite (overwrite=True)")
    elif records.exists() and records.stat().st_size:
        raise ValueError(f"{records} exists without a {EVAL_RUN_FILE} header, so it cannot be checked against this run; "
                         f"use a new --out or --overwrite (overwrite=True)")
    else:
        atomic_write_json(run, header)


def read_records(path: str | os.PathLike, repair: bool = False) -> dict[tuple[str, str], dict]:
    """Records of a JSONL file keyed by (setting spec, problem id). A last line cut off by a kill (no
    newline at its end: every record is written with its newline) is ignored, and cut from the file
    when ``repair`` so that appends start on a fresh line; any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    lines = data[:end].decode("utf-8").splitlines()
    records: dict[tuple[str, str], dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key = (r["setting"], r["problem_id"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}, line {lineno}: not a record ({exc}); use a new --out or --overwrite") from None
        records[key] = r
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def _record(setting_spec: str, problem: EvalProblem, prompt_text: str, completion) -> dict:
    return {
        "setting": setting_spec, "problem_id": problem.id, "prompt": prompt_text, "completion": completion.text,
        "extracted_strict": extract_answer(completion.text, "strict"),
        "extracted_flexible": extract_answer(completion.text, "flexible"),
        "gold": problem.gold,
        "correct_strict": is_correct(completion.text, problem.gold, "strict"),
        "correct_flexible": is_correct(completion.text, problem.gold, "flexible"),
        "generated_tokens": completion.generated_tokens,
    }


def evaluate(model, tokenizer, problems, settings, n: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 256, seed: int = 0, *, metric: str = "strict", out: str | os.PathLike | None = None,
             overwrite: bool = False, on_progress: Callable[[str, int, int], None] | None = None,
             model_name: str | None = None, data_name: str | None = None, device=None, dtype=None,
             engine: str = DEFAULT_ENGINE) -> EvalReport:
    """Evaluate ``model`` on ``problems`` clean and under each of ``settings``; return an ``EvalReport``.

    problems: ``hwnoise.data.Problem``s (or mappings with id, question, gold); ``n`` keeps the first n.
    settings: ``Emulation``s or spec strings (``"relative:0.05@ops"``, ``"weights:nvfp4"``,
    ``"aqn:0.01"``); "clean" is always evaluated, first, since every comparison is against it.
    Generation is greedy, batched with left padding, ``max_new_tokens`` at most, under
    ``setting.applied(model, seed=seed, step=batch_index)``.
    metric: "strict" (``#### N``) or "flexible" (last number): the one the robustness class uses;
    the report gives both. out: a directory for ``run.json`` and the per-problem ``records.jsonl``
    (written as each batch finishes; a rerun resumes from them); ``overwrite`` starts it afresh.
    on_progress(setting_label, done, total) is called as batches finish. device, dtype: move / cast
    the model first (in place; None leaves it as it is, a model spread by a device map too). engine:
    what generates, part of the run's identity ("hf": transformers). Bad input, a setting that does
    not fit the model included (``check_settings``), raises ValueError before anything is generated
    or written. ``run.json`` holds the run's identity (``hwnoise.identity``: the plans by content, the
    dtype and device the model really has); a rerun into ``out`` with another one is refused.
    """
    import torch

    checked = check_problems(problems, n)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    if metric not in ANSWER_METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(ANSWER_METRICS)}")
    from ..engines import evaluation_engine  # engines (same layer) build on eval.generate: imported on use

    emulations = parse_settings(settings)
    given = model
    gen = evaluation_engine(engine, model, tokenizer, seed=seed, dtype=dtype)  # ValueError: unknown engine
    gen.check(emulations)  # what the engine cannot apply is refused by name (vLLM: before it starts)
    if engine == DEFAULT_ENGINE:
        place(model, device, dtype)
    else:  # vLLM: the settings resolve on the engine's meta-device reference model
        model, tokenizer = gen.reference, gen.tokenizer
        model_name = model_name or gen.spec
    check_settings(model, emulations, seed)  # every setting against this model, before any work
    name = _model_name(model, model_name)
    placed_dtype, placed_device = gen.placement()
    header = _header(name, emulations, seed, batch_size, max_new_tokens, checked, dtype=placed_dtype,
                     device=placed_device, engine=engine)

    records: dict[tuple[str, str], dict] = {}
    seconds: dict[str, float] = {}
    was_training = model.training
    with ExitStack() as stack:
        sink = None
        if out is not None:
            out = prepare_out_dir(out, what="out")  # an existing file or a read-only directory: ValueError
            check_outputs(out, EVAL_OUTPUTS, "hwnoise eval", what="out")  # a file of the same name not ours
            out.mkdir(parents=True, exist_ok=True)
            _prepare_dir(out, header, overwrite)
            records = read_records(out / RECORDS_FILE, repair=True)
            sink = stack.enter_context(open(out / RECORDS_FILE, "a", encoding="utf-8"))
        stack.callback(model.train, was_training)
        if gen is not given:  # an engine evaluate started for itself is shut down with it
            stack.callback(gen.close)
        model.eval()
        prompts = build_prompts(tokenizer, [p.question for p in checked])
        batches = [range(i, min(i + batch_size, len(checked))) for i in range(0, len(checked), batch_size)]
        for setting in emulations:
            spec, label = setting.spec, setting.label
            done = sum((spec, p.id) in records for p in checked)
            if on_progress:
                on_progress(label, done, len(checked))
            t0 = time.perf_counter()
            for step, batch in enumerate(batches):
                missing = [i for i in batch if (spec, checked[i].id) not in records]
                if not missing:
                    continue
                with torch.no_grad(), gen.applied(setting, seed=seed, step=step):
                    completions = gen.generate([prompts[i] for i in batch], max_new_tokens)
                for i in missing:  # records written before a kill stay; the recomputed ones are identical
                    r = _record(spec, checked[i], prompts[i].text, completions[i - batch.start])
                    records[(spec, checked[i].id)] = r
                    if sink is not None:
                        sink.write(json.dumps(r, ensure_ascii=False) + "\n")
                        sink.flush()
                if sink is not None:
                    os.fsync(sink.fileno())
                done += len(missing)
                if on_progress:
                    on_progress(label, done, len(checked))
            seconds[spec] = time.perf_counter() - t0

    results = [SettingResult.from_records(s.spec, s.label, s.to_dict(), s.scale,
                                          [records[(s.spec, p.id)] for p in checked]) for s in emulations]
    return EvalReport(model=name, data=data_name, problems=[p.id for p in checked], seed=seed, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, metric=metric, settings=results, seconds=seconds)


