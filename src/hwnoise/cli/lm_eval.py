"""`hwnoise lm-eval`: any lm-evaluation-harness task clean and under each emulation setting, with
the paired statistics of `hwnoise eval` (hwnoise.integrations.lm_eval)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOption, DtypeOption
from .common import _check_out, _fail, _load_model, _print_wide, app, console, progress_bar


def _gen_kwargs(items: list[str] | None) -> dict | None:
    """["max_gen_toks=64", "temperature=0"] -> {"max_gen_toks": 64, "temperature": 0}; ValueError naming a bad item."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad --gen-kwargs {item!r}; expected KEY=VALUE, e.g. max_gen_toks=64")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out or None


@app.command("lm-eval")
def lm_eval_command(
    model: Annotated[str, typer.Argument(help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id.")] = "default",
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated lm-eval tasks or groups; 'gsm8k_local' is GSM8K from a local file.")] = "gsm8k_local",
    setting: Annotated[list[str] | None, typer.Option("--setting", "-s", help="An emulation spec, e.g. 'weights:mxfp4' or 'relative:0.05@ops' (repeatable); clean is always run.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="The first N documents of each task (default: all).")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples (default: each task's own; 5 for GSM8K).")] = None,
    gen_kwargs: Annotated[list[str] | None, typer.Option("--gen-kwargs", help="Generation argument KEY=VALUE for generation tasks (repeatable), e.g. max_gen_toks=64.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="lm-eval's batch size; 1 keys each request's noise to that request alone.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the emulation's noise (and of the bootstrap).")] = 0,
    gsm8k_path: Annotated[str | None, typer.Option("--gsm8k-path", help="Local GSM8K test .jsonl for gsm8k_local (default: $HWNOISE_GSM8K, else /work/shared/data/gsm8k/test.jsonl); few-shot examples from train.jsonl beside it.")] = None,
    include_path: Annotated[list[Path] | None, typer.Option("--include-path", help="A folder of your own lm-eval task YAMLs (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: lm-eval.json, lm-eval-run.json, samples/ and results/ per task and setting. A rerun resumes.")] = Path("hwnoise-out/lm-eval"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute every pair instead of resuming.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Run lm-eval TASKS on MODEL clean and under each --setting: metric with 95 % intervals, paired tests."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tasks are offline unless the user says otherwise
    _check_out(out)
    try:  # the checks that need no lm-eval first: a typo is reported in a second, not after its import
        from ..emulation import Emulation

        for spec in setting or []:
            Emulation.parse(spec)
        _gen_kwargs(gen_kwargs)
        if gsm8k_path is not None and not Path(gsm8k_path).expanduser().is_file():
            raise ValueError(f"--gsm8k-path {gsm8k_path!r} is not a file; give a GSM8K-format .jsonl "
                             "(one {\"question\": ..., \"answer\": \"... #### N\"} per line)")
        for name, value, low in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0), ("--batch-size", batch_size, 1),
                                 ("--threads", threads, 1)):
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}; got {value}")
    except ValueError as exc:
        _fail(str(exc))
    try:
        from ..integrations.lm_eval import build_report, plan_lm_eval, run_pairs, save_report, table
    except ImportError as exc:
        _fail(f"hwnoise lm-eval needs lm-eval: pip install 'hwnoise[lm-eval]' ({exc})")
    from ..devices import resolve_device

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        plan = plan_lm_eval(model, tasks, setting, out, limit=limit, num_fewshot=num_fewshot,
                            gen_kwargs=_gen_kwargs(gen_kwargs), batch_size=batch_size, seed=seed,
                            include_paths=include_path or (), gsm8k_path=gsm8k_path, dtype=dtype,
                            device=str(resolve_device(device)).split(":")[0], overwrite=overwrite)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"[bold]{model}[/]: tasks {', '.join(plan.tasks)}; settings {', '.join(s.spec for s in plan.settings)}; "
                  f"{len(plan.pairs) - len(plan.pending)} of {len(plan.pairs)} task x setting pairs already in {out}")
    seconds: dict[str, float] = {}
    if plan.pending:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        net, tokenizer = _load_model(model, device, dtype)
        with progress_bar(transient=False) as progress:
            bar = progress.add_task("task x setting pairs", total=len(plan.pairs), completed=len(plan.pairs) - len(plan.pending))

            def on_start(pair):
                console.print(f"running {pair.task} under {pair.setting.spec} ...", markup=False, highlight=False)

            def on_pair(pair, s):
                seconds[f"{pair.task}|{pair.setting.spec}"] = s
                console.print(f"{pair.task} under {pair.setting.spec}: {s:.1f} s", markup=False, highlight=False)
                progress.update(bar, advance=1)

            try:
                run_pairs(plan, net, tokenizer, on_start=on_start, on_pair=on_pair)
            except ValueError as exc:
                _fail(str(exc))
    try:
        data = build_report(plan, seconds)
    except ValueError as exc:
        _fail(str(exc))
    path = save_report(plan, data)
    for task in plan.tasks:
        _print_wide(table(data, task))
        for c in data["tasks"][task]["comparisons"]:
            console.print(f"{task} / {c['label']}: {c['reason']}", markup=False, highlight=False)
    console.print(f"done in {time.perf_counter() - t0:.1f} s; wrote {path} (samples/ and results/ beside it)")
