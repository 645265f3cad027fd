"""`hwnoise train`: GRPO/DAPO fine-tuning under emulated hardware, from a YAML config."""
# ruff: noqa: B008  (typer declares options as argument defaults)

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import _check_out, _fail, _quiet_third_party_logs, app, console, progress_bar


@app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def train_command(
    config: Path = typer.Argument(None, help="YAML config (see examples/); every key is a TrainConfig field."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. steps=6 aqn.sigma_start=0.02 "
                                          "lora.targets=q_proj,v_proj emulation.rollout=null."),
    resume: str = typer.Option(None, "--resume", help="Continue from a checkpoint directory, or 'latest' (the "
                               "newest checkpoint-N in run_dir): AQN schedule, data order, optimizer, RNG."),
    run_dir: Path = typer.Option(None, "--out", "-o", help="Run directory (overrides run_dir in the config)."),
    keys: bool = typer.Option(False, "--keys", help="List every config key with its help text and exit."),
) -> None:
    """Fine-tune with GRPO/DAPO (TRL) while rollouts run under an emulated format or noise, with AQN."""
    from ..rl import ConfigError, TrainConfig
    from ..rl.run import finished_at, preflight

    if keys:
        for key, text in TrainConfig.fields_help().items():
            console.print(f"[bold]{key}[/]: {text}")
        return
    if config is None:
        _fail("give a config file: hwnoise train CONFIG.yaml [key=value ...] (examples/ holds some)")
    items = list(overrides or [])
    if run_dir is not None:
        items.append(f"run_dir={run_dir}")
    try:
        cfg = TrainConfig.from_yaml(config, items)
    except ConfigError as exc:
        _fail(str(exc))
    _check_out(cfg.run_dir, what="--out" if run_dir is not None else "run_dir")
    try:
        checkpoint = preflight(cfg, resume)  # before any weight loads
    except (ConfigError, FileNotFoundError, OSError, ValueError) as exc:
        _fail(str(exc))
    done = finished_at(checkpoint)
    if done is not None:
        console.print(f"{cfg.run_dir}: this run already finished (step {done[0]} of {done[1]}, {checkpoint}); "
                      "nothing to train. To train further, start a new run with more steps.", markup=False)
        return

    from ..rl import train

    _quiet_third_party_logs()
    t0 = time.perf_counter()
    before = _snapshot(Path(cfg.run_dir))
    evals = []

    with progress_bar(transient=False) as progress:
        task = progress.add_task("loading model ...", total=None)
        last: dict = {}

        def on_eval(step, report):
            clean = report.clean
            evals.append((step, clean.accuracy("strict"), clean.accuracy("flexible"), len(report.problems)))

        def hook(trainer):
            from transformers import PrinterCallback, TrainerCallback

            def describe(state):
                parts = [f"step {state.global_step}"]
                if "reward" in last:
                    parts.append(f"reward {last['reward']:.3f}")
                if "aqn/sigma" in last:
                    parts.append(f"sigma {last['aqn/sigma']:.2g}")
                if evals:
                    parts.append(f"eval {evals[-1][1]:.1f} %")
                progress.update(task, completed=state.global_step, description=" | ".join(parts))

            class Progress(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    progress.update(task, total=state.max_steps, completed=state.global_step, description="training")

                def on_log(self, args, state, control, logs=None, **kwargs):
                    last.update({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})
                    describe(state)

                def on_step_end(self, args, state, control, **kwargs):
                    if not control.should_log:  # else on_log follows and shows this step's reward
                        describe(state)

            trainer.remove_callback(PrinterCallback)  # the progress line replaces the raw log dicts
            trainer.add_callback(Progress())

        try:
            out = train(cfg, resume=resume, on_eval=on_eval, trainer_hook=hook, progress=False)
        except ConfigError as exc:
            _fail(str(exc))
        except (FileNotFoundError, OSError, ValueError) as exc:  # model or data that cannot be read
            _fail(str(exc))
    from rich.table import Table

    if evals:
        table = Table(title="Held-out accuracy (clean weights)")
        for col in ("step", "strict %", "flexible %", "n"):
            table.add_column(col, justify="right")
        for step, strict, flexible, n in evals:
            table.add_row(str(step), f"{strict:.1f}", f"{flexible:.1f}", str(n))  # points already
        console.print(table)
    wrote = _written(Path(out), before)
    console.print(f"trained in {time.perf_counter() - t0:.1f} s; wrote {out}/ ({', '.join(wrote) or 'nothing'})",
                  markup=False, highlight=False)


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under ``run_dir``, by path relative to it."""
    if not run_dir.is_dir():
        return {}
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run_dir.rglob("*") if p.is_file()}


def _written(run_dir: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """The top-level entries of ``run_dir`` this run created or changed (against ``before``): the
    closing line names those only, not every file a run may write."""
    after = _snapshot(run_dir)
    changed = {path for path, stamp in after.items() if before.get(path) != stamp}
    out = set()
    for path in changed:
        top, sep, _ = path.partition("/")
        if top.startswith("."):
            continue
        out.add(top + ("/" if sep else ""))
    return sorted(out)
