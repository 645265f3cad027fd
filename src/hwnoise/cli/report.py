"""`hwnoise report`: one table of training runs, as Markdown and JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import _check_out, _fail, app, console


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories written by `hwnoise train`."),
    baseline: str = typer.Option(None, "--baseline", "-b", help="The run the others are compared with (directory name or path). Default: the first run without emulation or AQN."),
    metric: str = typer.Option("flexible", "--metric", "-m", help="Accuracy metric: 'strict' (#### N) or 'flexible' (last number)."),
    out: Path = typer.Option(Path("hwnoise-out/report"), "--out", "-o", help="Output directory for runs.md and runs.json (written atomically)."),
) -> None:
    """Compare training runs: configuration, final and best held-out accuracy with intervals, delta vs the baseline."""
    from ..rl.runs import runs_table, summarize_runs, write_runs_report

    from ..io import json_with_keys, text_starting

    _check_out(out, outputs={"runs.json": json_with_keys("runs", "baseline", "metric"), "runs.md": text_starting("# Runs (")},
               command="hwnoise report")
    try:
        summary = summarize_runs(run_dirs, baseline=baseline, metric=metric)
    except ValueError as exc:
        _fail(str(exc))
    console.print(runs_table(summary))
    json_path, md_path = write_runs_report(summary, out)
    console.print(f"wrote {md_path} and {json_path}")
