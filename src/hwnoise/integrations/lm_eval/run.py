"""Run lm-eval tasks clean and under each emulation setting on the same documents, resumably.

The unit of work is one (task, setting) pair: ``lm_eval.simple_evaluate`` on one leaf task with an
``EmulatedHFLM`` for that setting, lm-eval's per-document samples kept. Layout of ``out``::

    lm-eval-run.json                  what was asked (model, tasks, settings, options)
    tasks/gsm8k_local.yaml            the offline GSM8K task (when asked for)
    samples/<task>/<setting>.jsonl    lm-eval's samples, one line per document (and filter)
    results/<task>/<setting>.json     lm-eval's results for the pair, its identity, wall time
    lm-eval.json                      the report: metric + interval per task and setting, paired
                                      statistics against clean (hwnoise.eval.stats)

A pair is finished when its results file exists (written after its samples, atomically). A rerun
skips finished pairs whose identity (model, setting, task config and data content, limit, few-shot,
generation arguments, batch size, seed, dtype, device, lm-eval and hwnoise versions) equals the
current one, refuses pairs whose identity differs, and runs the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...emulation import Emulation
from ...identity import IDENTITY_KEYS, check_same_identity, run_identity
from ...io import atomic_write_json, atomic_write_text, prepare_out_dir
from .tasks import GSM8K_TASK, build_task_manager, data_files_sha256, resolve_gsm8k_path, write_gsm8k_task

__all__ = ["LmEvalPlan", "Pair", "plan_lm_eval", "run_pairs", "setting_slug"]

RUN_FILE = "lm-eval-run.json"  # not run.json: hwnoise eval writes that name, and --out may be shared
REPORT_FILE = "lm-eval.json"
PAIR_KEYS = IDENTITY_KEYS + ("task", "task_config_sha256", "data_sha256", "limit", "num_fewshot", "gen_kwargs",
                             "batch_size", "seed", "lm_eval_version", "hwnoise_version")


def setting_slug(spec: str) -> str:
    """A file name for a setting spec: readable, and unique (a hash of the spec is appended)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:60] or "setting"
    return f"{readable}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


@dataclass
class Pair:
    """One task under one setting: its files and identity."""

    task: str
    setting: Emulation
    identity: dict
    samples_path: Path
    results_path: Path

    @property
    def done(self) -> bool:
        return self.results_path.exists()


@dataclass
class LmEvalPlan:
    """Everything checked before a model loads: the settings, the leaf tasks, the pairs to run."""

    out: Path
    model_name: str
    tasks: list[str]
    settings: list[Emulation]
    pairs: list[Pair]
    task_manager: object
    options: dict
    primary_metrics: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> list[Pair]:
        return [p for p in self.pairs if not p.done]


def _check_settings(settings) -> list[Emulation]:
    out: dict[str, Emulation] = {"clean": Emulation()}
    for s in settings or []:
        e = Emulation.parse(s)  # ValueError naming the bad spec and the accepted forms
        out.setdefault(e.spec, e)
    return list(out.values())


def _split_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks or [] if t and t.strip()]
    if not names:
        raise ValueError("no tasks given; name lm-eval tasks, e.g. --tasks gsm8k_local,arc_easy")
    return list(dict.fromkeys(names))


def plan_lm_eval(model_name: str, tasks, settings, out: str | os.PathLike, *, limit: int | None = None,
                 num_fewshot: int | None = None, gen_kwargs: dict | None = None, batch_size: int = 1, seed: int = 0,
                 include_paths: Sequence = (), gsm8k_path=None, dtype: str = "auto", device: str = "cpu",
                 overwrite: bool = False) -> LmEvalPlan:
    """Check every input and lay out the pairs, before any model is loaded.

    Args:
        model_name: the model as the user names it (part of the identity).
        tasks: lm-eval task or group names (a comma-separated string or a list); groups expand to
            their leaf tasks. ``gsm8k_local`` is the offline GSM8K (see ``hwnoise.integrations.lm_eval.tasks``).
        settings: emulation specs; clean is always run, first.
        out: the output directory (``hwnoise.io.prepare_out_dir`` policy: files of its own only).
        limit: the first ``limit`` documents of each task (lm-eval's ``limit``).
        num_fewshot, gen_kwargs: lm-eval's (None: each task's own).
        batch_size: lm-eval's batch size (1: each request's noise depends on that request alone).
        seed: the emulation's noise seed.
        include_paths: folders of the user's own task YAMLs.
        gsm8k_path: the local GSM8K test file for ``gsm8k_local`` (default ``$HWNOISE_GSM8K``, then
            the project's shared copy).
        dtype, device: what the model is asked to run in (identity; the real placement is checked too).
        overwrite: drop this directory's earlier pairs (only the files this command writes).

    Raises ValueError / FileNotFoundError naming the bad value and what is accepted.

    Example:
        >>> plan = plan_lm_eval("default", "gsm8k_local", ["weights:mxfp4"], "out/lm", limit=8)  # doctest: +SKIP
        >>> [(p.task, p.setting.spec) for p in plan.pending]  # doctest: +SKIP
        [('gsm8k_local', 'clean'), ('gsm8k_local', 'weights:mxfp4')]
    """
    import lm_eval

    from ... import __version__

    emulations = _check_settings(settings)
    names = _split_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 (the first N documents of each task); got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be an integer >= 0; got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    out = prepare_out_dir(out, what="--out")
    includes = [Path(p) for p in include_paths]
    if GSM8K_TASK in names:
        gsm8k = resolve_gsm8k_path(gsm8k_path)
        if gsm8k is None:
            raise FileNotFoundError(f"task {GSM8K_TASK!r} needs a local GSM8K file: give --gsm8k-path or set $HWNOISE_GSM8K")
        out.mkdir(parents=True, exist_ok=True)
        write_gsm8k_task(out / "tasks", gsm8k)
        includes.append(out / "tasks")
    manager = build_task_manager(includes, names)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, sorted(known), n=3) for t in unknown}
        detail = "; ".join(f"{t!r}" + (f" (close: {', '.join(h)})" if h else "") for t, h in hints.items())
        raise ValueError(f"unknown lm-eval task(s) {detail}; list them with `lm-eval ls tasks`, add your own "
                         f"YAMLs with --include-path, or use {GSM8K_TASK!r} (offline GSM8K)")
    try:
        loaded = manager.load(names)["tasks"]  # builds each task: its data must load here, offline too
    except Exception as exc:  # lm-eval and datasets raise many kinds; name the task and the cause
        raise ValueError(f"lm-eval could not build task(s) {', '.join(names)}: {type(exc).__name__}: {exc}") from None
    leaves = sorted(loaded)
    options = {"limit": limit, "num_fewshot": num_fewshot, "gen_kwargs": dict(gen_kwargs or {}) or None,
               "batch_size": batch_size, "seed": seed, "dtype": dtype, "device": device}
    if overwrite:
        for leaf in leaves:
            for s in emulations:
                for sub, ext in (("samples", "jsonl"), ("results", "json")):
                    (out / sub / leaf / f"{setting_slug(s.spec)}.{ext}").unlink(missing_ok=True)
        (out / REPORT_FILE).unlink(missing_ok=True)
    pairs = []
    for leaf in leaves:
        config = loaded[leaf].dump_config()
        config_text = json.dumps(config, sort_keys=True, default=str)
        for s in emulations:
            identity = {
                **run_identity(model_name, [s], dtype=dtype, device=device),
                "task": leaf, "task_config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                "data_sha256": data_files_sha256(config), "limit": limit, "num_fewshot": num_fewshot,
                "gen_kwargs": options["gen_kwargs"], "batch_size": batch_size, "seed": seed,
                "lm_eval_version": lm_eval.__version__, "hwnoise_version": __version__,
            }
            slug = setting_slug(s.spec)
            pair = Pair(leaf, s, identity, out / "samples" / leaf / f"{slug}.jsonl", out / "results" / leaf / f"{slug}.json")
            if pair.done:
                try:
                    stored = json.loads(pair.results_path.read_text(encoding="utf-8"))["identity"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{pair.results_path} is not a pair's results ({exc}); use a new --out or --overwrite") from None
                check_same_identity(stored, identity, str(pair.results_path), "use a new --out or --overwrite",
                                    keys=PAIR_KEYS)
            pairs.append(pair)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, {"model": model_name, "tasks": names, "leaf_tasks": leaves,
                                       "settings": [s.spec for s in emulations], **options,
                                       "include_paths": [str(p) for p in includes],
                                       "lm_eval_version": lm_eval.__version__, "hwnoise_version": __version__})
    return LmEvalPlan(out=out, model_name=model_name, tasks=leaves, settings=emulations, pairs=pairs,
                      task_manager=manager, options=options)


def _jsonable_sample(sample: dict) -> dict:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(sample, default=handle_non_serializable))


def run_pairs(plan: LmEvalPlan, model, tokenizer, *, on_pair: Callable[[Pair, float], None] | None = None,
              on_start: Callable[[Pair], None] | None = None) -> None:
    """Run every unfinished pair of ``plan`` on the loaded ``model``; write its samples and results.

    The model's real (dtype, device) must equal what finished pairs were made with (else ValueError).
    on_start(pair) / on_pair(pair, seconds) are called around each pair (progress).
    """
    import lm_eval

    from ...identity import model_placement
    from .model import EmulatedHFLM

    dtype, device = model_placement(model)
    for pair in plan.pairs:
        stored = {}
        if pair.done:
            stored = json.loads(pair.results_path.read_text(encoding="utf-8"))
            placement = stored.get("placement")
            if placement and placement != {"dtype": dtype, "device": device}:
                raise ValueError(f"{pair.results_path} was made with the model in {placement}, now "
                                 f"{ {'dtype': dtype, 'device': device} }; use a new --out or --overwrite")
    was_training = model.training
    model.eval()
    try:
        for pair in plan.pending:
            if on_start:
                on_start(pair)
            t0 = time.perf_counter()
            lm = EmulatedHFLM(pretrained=model, tokenizer=tokenizer, emulation=pair.setting, noise_seed=plan.options["seed"],
                              batch_size=plan.options["batch_size"])
            with lm.static_applied():
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=[pair.task], task_manager=plan.task_manager, limit=plan.options["limit"],
                    num_fewshot=plan.options["num_fewshot"], gen_kwargs=plan.options["gen_kwargs"],
                    log_samples=True, bootstrap_iters=0)
            seconds = time.perf_counter() - t0
            samples = results["samples"][pair.task]
            text = "".join(json.dumps(_jsonable_sample(s), ensure_ascii=False) + "\n" for s in samples)
            atomic_write_text(pair.samples_path, text)
            atomic_write_json(pair.results_path, {
                "identity": pair.identity, "placement": {"dtype": dtype, "device": device},
                "task": pair.task, "setting": pair.setting.spec, "seconds": seconds,
                "emulated_calls": lm.emulated_calls,
                "results": _jsonable_sample(results["results"][pair.task]),
                "n-samples": _jsonable_sample(results.get("n-samples", {}).get(pair.task)),
                "n-shot": _jsonable_sample(results.get("n-shot", {}).get(pair.task)),
                "config": _jsonable_sample(results["configs"][pair.task]),
                "versions": _jsonable_sample(results.get("versions", {}).get(pair.task)),
                "samples_file": str(pair.samples_path.relative_to(plan.out)),
            })
            if on_pair:
                on_pair(pair, seconds)
    finally:
        model.train(was_training)


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The samples of one pair (lm-eval's per-document records), as written by ``run_pairs``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
