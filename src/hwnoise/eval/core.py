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

from ..compat import module_aliases
from ..devices import place
from ..emulation import Emulation
from ..io import atomic_write_json, prepare_out_dir
from ..rewards import extract_answer, is_correct
from .generate import build_prompts, generate_greedy
from .report import ANSWER_METRICS, EvalReport, SettingResult

__all__ = ["EVAL_RUN_FILE", "RECORDS_FILE", "EvalProblem", "check_problems", "evaluate", "parse_settings", "read_records"]

EVAL_RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
REQUIRED_FIELDS = ("id", "question", "gold")
HEADER_FIELDS = ("model", "settings", "seed", "batch_size", "max_new_tokens", "problems", "problems_sha256",
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


def _header(model_name, settings, seed, batch_size, max_new_tokens, problems) -> dict:
    from .. import __version__  # the top-level package defines it (a module-level import would be circular)

    return {"model": model_name, "settings": [s.spec for s in settings], "seed": seed, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "problems": len(problems), "problems_sha256": _problems_hash(problems),
            "hwnoise_version": __version__}


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
        differ = [k for k in HEADER_FIELDS if old.get(k) != header[k]]
        if differ:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {header[k]!r} now" for k in differ)
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
             model_name: str | None = None, data_name: str | None = None, device=None, dtype=None) -> EvalReport:
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
    the model first (in place; None leaves it as it is, a model spread by a device map too). Bad input
    raises ValueError before anything is generated.
    """
    import torch

    checked = check_problems(problems, n)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    if metric not in ANSWER_METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(ANSWER_METRICS)}")
    emulations = parse_settings(settings)
    place(model, device, dtype)
    name = _model_name(model, model_name)
    header = _header(name, emulations, seed, batch_size, max_new_tokens, checked)

    records: dict[tuple[str, str], dict] = {}
    seconds: dict[str, float] = {}
    was_training = model.training
    with ExitStack() as stack:
        sink = None
        if out is not None:
            out = prepare_out_dir(out, what="out")  # an existing file or a read-only directory: ValueError
            out.mkdir(parents=True, exist_ok=True)
            _prepare_dir(out, header, overwrite)
            records = read_records(out / RECORDS_FILE, repair=True)
            sink = stack.enter_context(open(out / RECORDS_FILE, "a", encoding="utf-8"))
        stack.callback(model.train, was_training)
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
                with torch.no_grad(), setting.applied(model, seed=seed, step=step):
                    completions = generate_greedy(model, tokenizer, [prompts[i] for i in batch], max_new_tokens)
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


__getattr__ = module_aliases(__name__, {"RUN_FILE": "EVAL_RUN_FILE"})
