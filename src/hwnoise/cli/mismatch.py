"""`hwnoise mismatch`: the rollout-training mismatch of rollout settings, predicted before training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceMapOption, DeviceOption, DtypeOption
from .common import _check_out, _check_settings_before_loading, _fail, _load_model, _print_wide, app, console, progress_bar


@app.command("mismatch")
def mismatch_command(
    model: Annotated[str, typer.Argument(help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id.")] = "default",
    rollout: Annotated[list[str], typer.Option("--rollout", "-r", help="A rollout emulation spec (repeat for several): 'clean', 'weights:nvfp4', 'relative:0.05@ops', 'weights:plan.json', 'aqn:0.01', ...")] = None,
    training: Annotated[str, typer.Option("--training", help="The training side's emulation spec ('clean': the model at its own precision).")] = "clean",
    prompts: Annotated[str, typer.Option("--prompts", "-d", help="Prompts: 'arith', 'arith:level=1' or a GSM8K-format .jsonl/.parquet path.")] = "arith",
    n: Annotated[int, typer.Option("--n", "-n", help="Prompts per setting.")] = 16,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", help="Completions drawn per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per completion at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (both sides' log-probabilities use it).")] = 1.0,
    clip: Annotated[float, typer.Option("--clip", help="TIS truncation C for the importance-ratio shares (verl's rollout_is_threshold default: 2).")] = 2.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per generate call and per scoring forward.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Sampling and noise seed (every setting draws the same random numbers).")] = 0,
    rank_by: Annotated[str, typer.Option("--rank-by", help="Metric that ranks the settings (see docs/mismatch.md).")] = "abs_logp_diff",
    rollout_logprobs: Annotated[str, typer.Option("--rollout-logprobs", help="'rescore': the rollout side from a teacher-forced forward under its emulation (0 when both sides share numerics); 'sampler': from the logits generate drew with (adds the engine's numerics).")] = "rescore",
    engine: Annotated[str, typer.Option("--engine", help="Generation engine: 'hf' (transformers generate).")] = "hf",
    attribute: Annotated[str, typer.Option("--attribute", help="Also rank the modules of this rollout spec (e.g. weights:nvfp4), one module's emulation at a time on the policy's own samples; writes attribution.json.")] = None,
    plan: Annotated[str, typer.Option("--plan", help="Also search a mixed-precision plan that targets the mismatch: wider formats, e.g. 'bf16' or 'mxfp8_e4m3,bf16' (base: --plan-base); writes plan.json.")] = None,
    plan_base: Annotated[str, typer.Option("--plan-base", help="The rollout weight format the plan search starts from.")] = "mxfp4",
    target_kl: Annotated[float, typer.Option("--target-kl", help="Plan target: mismatch KL per token at most this (default: a third of the all-base KL).")] = None,
    top: Annotated[int, typer.Option("--top", help="Rows of the attribution table.")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: mismatch.json, mismatch.png (and attribution.json, plan.json); written atomically.")] = Path("hwnoise-out/mismatch"),
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
) -> None:
    """Predict the rollout-training mismatch of each --rollout setting: sample under it, score the same tokens with the training policy."""
    from ..data import load_problems
    from ..emulation import Emulation
    from ..io import atomic_write_json
    from ..mismatch import ATTRIBUTION_FILE, attribute as run_attribute, check_options, mismatch, parse_settings
    from ..mismatch import views

    try:
        if not rollout:
            raise ValueError("give at least one --rollout SPEC, e.g. --rollout clean --rollout weights:nvfp4")
        check_options(n=n, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                      temperature=temperature, clip=clip, batch_size=batch_size, seed=seed, rank_by=rank_by,
                      rollout_logprobs=rollout_logprobs, engine=engine)
        settings = parse_settings(rollout)
        train = Emulation.parse(training)
        load_problems(prompts, n=n, seed=seed)  # a bad prompt source or too few problems fail here
        if attribute is not None:
            a = Emulation.parse(attribute)
            if a.is_clean or a.aqn_sigma or (a.error is not None and a.where == "ops"):
                raise ValueError(f"--attribute {attribute!r}: per-module attribution takes weight formats "
                                 "(weights:FMT, weights:plan.json), input formats (inputs:FMT) and module-level errors "
                                 "(e.g. relative:0.05@output); operator noise (@ops) and AQN act on every module at once")
            if not train.is_clean:
                raise ValueError(f"--attribute runs on the policy's own samples with a clean training side; "
                                 f"got --training {training!r}")
        if plan is not None:
            from ..scan.plan import parse_candidates

            parse_candidates(plan, plan_base)
            if not train.is_clean:
                raise ValueError(f"--plan searches against a clean training side; got --training {training!r}")
        elif target_kl is not None:
            raise ValueError("--target-kl is a plan target: give --plan too (e.g. --plan bf16)")
        if top < 1:
            raise ValueError(f"--top {top} is not accepted; give the number of table rows, >= 1")
    except ValueError as exc:
        _fail(str(exc))
    _check_out(out)
    _check_settings_before_loading(model, [s.spec for s in settings] + [train.spec] +
                          ([attribute] if attribute else []), seed)

    t0 = time.perf_counter()
    net, tokenizer = _load_model(model, device, dtype, device_map)
    console.print(f"[bold]{model}[/]: {len(settings)} rollout setting(s) vs training={train.spec}, {n} prompts x "
                  f"{samples_per_prompt}, up to {max_new_tokens} new tokens (loaded in {time.perf_counter() - t0:.1f} s)")
    with progress_bar() as progress:
        state = {"label": None, "task": None}

        def on_progress(label, done, total):
            if label != state["label"]:  # a new phase (sample / score a setting, attribute): its own count
                state["label"] = label
                state["task"] = progress.add_task(label[:60], total=total)
            progress.update(state["task"], completed=done)

        try:
            report = mismatch(net, tokenizer, settings, training=train, prompts=prompts, n=n,
                              samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, clip=clip, batch_size=batch_size, seed=seed, rank_by=rank_by,
                              rollout_logprobs=rollout_logprobs, engine=engine, model_name=model,
                              on_progress=on_progress)
            extra = {}
            if attribute is not None:
                report.attribution = run_attribute(net, tokenizer, attribute, prompts=prompts, n=n,
                                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                                   batch_size=batch_size, seed=seed, on_progress=on_progress)
                extra[ATTRIBUTION_FILE] = report.attribution
            if plan is not None:
                from ..mismatch import search_mismatch_plan

                result = search_mismatch_plan(net, tokenizer, plan_base, plan, target_kl=target_kl, prompts=prompts,
                                              n=n, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                              on_progress=on_progress)
                extra["plan.json"] = dict(result.formats)
                extra["mismatch_plan.json"] = result.to_json()
        except ValueError as exc:
            _fail(str(exc))
    _print_wide(views.table(report))
    if report.attribution is not None:
        _print_wide(views.attribution_table(report.attribution, top))
    if plan is not None:
        for line in result.recommendation():
            console.print(line)
    report.seconds["wall"] = round(time.perf_counter() - t0, 3)
    try:
        path = report.save(out)
        for name, data in extra.items():
            atomic_write_json(path / name, data)
    except (ValueError, OSError) as exc:
        _fail(f"could not write into {out}: {exc}")
    console.print(f"wrote {path}/: " + ", ".join(list(report.OUTPUT_FILES) + list(extra)) +
                  f" ({report.seconds['wall']:.1f} s)")
