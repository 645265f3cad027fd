"""The `hwnoise` command (typer + rich)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

def _quiet_third_party_logs() -> None:
    """torchao logs missing CUDA extensions and torch logs pytree deprecations on import: noise
    on a CPU machine. The CLI is an application, so it may set these levels (the library does not)."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


app = typer.Typer(
    help="Emulate number formats and hardware noise, find the layers they hurt, train them robust.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _load_model(model: str):
    """(model, tokenizer) with a spinner and quiet third-party logs; a bad spec exits with code 2."""
    import transformers

    from .models import load

    _quiet_third_party_logs()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with console.status(f"loading {model} ..."):
        try:
            return load(model)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command("formats")
def formats_command(
    model: str = typer.Argument("default", help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id."),
    formats: str = typer.Option(None, "--formats", "-f", help="Comma-separated formats (default: a survey of 4- to 16-bit formats). See --list."),
    out: Path = typer.Option(Path("hwnoise-out/formats"), "--out", "-o", help="Output directory for formats.json."),
    list_formats: bool = typer.Option(False, "--list", help="List every registered format and exit."),
) -> None:
    """Quantize every linear weight of MODEL with each format and compare the errors."""
    from . import formats as F
    from .formats.survey import DEFAULT_SURVEY, linear_weights, survey_formats
    from .report import atomic_write_json

    if list_formats:
        table = Table(title="hwnoise formats")
        for col in ("name", "bits/value", "block", "scale", "rounding", "description"):
            table.add_column(col)
        for name in F.names():
            s = F.get(name)
            table.add_row(name, f"{s.bits_per_value:.3g}", "x".join(map(str, s.block)) if s.block else "-",
                          s.scale_format + (f" ({s.scale_mode})" if s.scale_mode else ""), s.rounding,
                          s.description + (f" (alias of {s.alias_of})" if s.alias_of else ""))
        console.print(table)
        return
    names = [f.strip() for f in formats.split(",") if f.strip()] if formats else list(DEFAULT_SURVEY)
    try:
        for n in names:
            F.get(n)
    except ValueError as exc:
        _fail(str(exc))

    from .models import DEFAULT_MODEL_NOTE

    t0 = time.perf_counter()
    net, _ = _load_model(model)
    weights = linear_weights(net)
    console.print(f"[bold]{model}[/]: {len(weights)} linear layers, "
                  f"{sum(w.numel() for w in weights.values()) / 1e6:.1f}M weights "
                  f"(loaded in {time.perf_counter() - t0:.1f} s)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("quantizing", total=len(names) * len(weights))

        def step(fmt_name, layer):
            progress.update(task, advance=1, description=f"{fmt_name:<11} {layer}")

        result = survey_formats(weights, names, on_step=step)

    table = Table(title=f"Linear weights of {model} under each format")
    for col in ("format", "bits/value", "SQNR dB (all)", "SQNR dB (layer mean)", "SQNR dB (worst layer)",
                "MSE", "rel. error", "deadzone %", "saturation %"):
        table.add_column(col, justify="right" if col != "format" else "left")
    for name, r in result.items():
        table.add_row(name, f"{r['bits_per_value']:.3g}", f"{r['sqnr_db_total']:.2f}", f"{r['sqnr_db_mean']:.2f}",
                      f"{r['sqnr_db_min']:.2f}", f"{r['mse']:.3e}", f"{r['relative_error']:.4f}",
                      f"{100 * r['deadzone_ratio']:.3f}", f"{100 * r['saturation_ratio']:.3f}")
    console.print(table)
    note = DEFAULT_MODEL_NOTE if model in ("default", "smollm2") else None
    if note:
        console.print(f"[dim]{note}[/]")
    path = atomic_write_json(out / "formats.json", {
        "model": model, "note": note, "layers": len(weights), "formats": result,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    console.print(f"wrote {path}")


def _parse_thresholds(text: str | None) -> dict | None:
    """"sqnr_db=18,deadzone_ratio=0.1" -> {"sqnr_db": 18.0, "deadzone_ratio": 0.1}."""
    if not text:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad threshold {part!r}; expected name=number, e.g. sqnr_db=20,deadzone_ratio=0.05") from None
        if not sep:
            raise ValueError(f"bad threshold {part!r}; expected name=number, e.g. sqnr_db=20")
    return out


@app.command("scan")
def scan_command(
    model: str = typer.Argument("default", help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id."),
    fmt: str = typer.Option("mxfp4", "--format", "-f", help="Number format or spec string (mxfp4, nvfp4, mxfp8, 'mxfp4:rceil'). See `hwnoise formats --list`."),
    mode: str = typer.Option("weight", "--mode", "-m", help="'weight': quantize each module's weights (W4A16-style); 'input': its input activations (W16A4-style)."),
    out: Path = typer.Option(Path("hwnoise-out/scan"), "--out", "-o", help="Output directory: scan.json, scan.html, sigma_multipliers.json, PNG plots (written atomically)."),
    faults: bool = typer.Option(False, "--faults", help="Also run the fault scan (gain, kurtosis, instability per decoder layer), bf16 vs --format."),
    texts: Path = typer.Option(None, "--texts", help="Calibration texts: one per line, or GSM8K jsonl (the 'question' field). Default: the built-in set."),
    samples: int = typer.Option(8, "--samples", "-n", help="Number of calibration texts."),
    max_length: int = typer.Option(None, "--max-length", help="Tokens per calibration text (truncated; default 16). More tokens: steadier end-to-end numbers, a longer scan."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--no-end-to-end", help="Measure loss increase and KL with only each module quantized."),
    thresholds: str = typer.Option(None, "--thresholds", help="Problematic when crossed, e.g. 'sqnr_db=20,deadzone_ratio=0.05,saturation_ratio=0.01,relative_error=0.1'."),
    top: int = typer.Option(10, "--top", help="Rows in the table of the worst layers."),
) -> None:
    """Scan MODEL layer by layer under a number format: which modules break, how badly, what to do."""
    from . import formats as F
    from .scan import MODES, SCAN_EXCLUDE, Thresholds, calibration_texts
    from .scan import scan as run_scan
    from .scan.calibration import DEFAULT_MAX_LENGTH
    from .select import select_modules

    try:
        F.get(fmt)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        threshold_values = Thresholds.coerce(_parse_thresholds(thresholds))
        calibration = calibration_texts(texts if texts is None else Path(texts), samples)
    except ValueError as exc:
        _fail(str(exc))

    from .models import DEFAULT_MODEL_NOTE

    t0 = time.perf_counter()
    net, tokenizer = _load_model(model)
    modules = select_modules(net, "linear", exclude=SCAN_EXCLUDE, default_exclude=False)
    console.print(f"[bold]{model}[/]: {len(modules)} linear modules, {len(calibration)} calibration texts "
                  f"(loaded in {time.perf_counter() - t0:.1f} s)")
    phases = 2 if end_to_end else 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("scanning", total=phases * len(modules))

        def step(phase, name):
            progress.update(task, advance=1, description=f"{phase:<10} {name}")

        try:
            report = run_scan(net, tokenizer, calibration, format=fmt, mode=mode, thresholds=threshold_values,
                              end_to_end=end_to_end, samples=None, max_length=max_length or DEFAULT_MAX_LENGTH, on_step=step,
                              model_name=model)
        except ValueError as exc:
            _fail(str(exc))
    if model in ("default", "smollm2"):
        report.note = DEFAULT_MODEL_NOTE
    if faults:
        from .scan import scan_faults

        with console.status(f"fault scan: bf16 vs {fmt} ..."):
            report.faults = scan_faults(net, tokenizer, calibration, "bf16", fmt, samples=None,
                                        max_length=max_length or DEFAULT_MAX_LENGTH)
    console.print(report.to_table(top, by="layer"))
    console.print(report.to_table(top, by="module"))
    if report.faults is not None:
        console.print(report.faults.to_table())
    s = report.to_json()["summary"]
    console.print(f"SQNR {s['sqnr_db_min']:.2f} to {s['sqnr_db_max']:.2f} dB (mean {s['sqnr_db_mean']:.2f}); "
                  f"scan took {report.seconds['total']:.1f} s (metrics {report.seconds['metrics']:.1f} s, "
                  f"end-to-end {report.seconds['end_to_end']:.1f} s)")
    console.print(f"[bold]Recommendation:[/] {report.recommendation()}")
    if report.note:
        console.print(f"[dim]{report.note}[/]")
    path = report.save(out)
    console.print(f"wrote {path}/: " + ", ".join(sorted(p.name for p in path.iterdir())))


@app.command("version")
def version_command() -> None:
    """Print the hwnoise version."""
    from . import __version__

    console.print(__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
