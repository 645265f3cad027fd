"""`hwnoise scan`: layer sensitivity of a model under a number format."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import DeviceMapOption, DeviceOption, DtypeOption
from .common import _check_out, _fail, _load_model, app, console, progress_bar


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
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
) -> None:
    """Scan MODEL layer by layer under a number format: which modules break, how badly, what to do."""
    from .. import formats as F
    from ..scan import MODES, SCAN_EXCLUDE, Thresholds, calibration_texts
    from ..scan import scan as run_scan
    from ..scan.calibration import DEFAULT_MAX_LENGTH
    from ..select import select_modules

    try:
        F.get(fmt)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        threshold_values = Thresholds.coerce(_parse_thresholds(thresholds))
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length {max_length} is not accepted; give tokens per text >= 1 "
                             f"(default {DEFAULT_MAX_LENGTH})")
        if top < 1:
            raise ValueError(f"--top {top} is not accepted; give the number of table rows, >= 1 (default 10)")
        calibration = calibration_texts(texts if texts is None else Path(texts), samples)
    except ValueError as exc:
        _fail(str(exc))
    _check_out(out)

    from ..models import DEFAULT_MODEL_NOTE

    t0 = time.perf_counter()
    net, tokenizer = _load_model(model, device, dtype, device_map)
    modules = select_modules(net, "linear", exclude=SCAN_EXCLUDE, default_exclude=False)
    console.print(f"[bold]{model}[/]: {len(modules)} linear modules, {len(calibration)} calibration texts "
                  f"(loaded in {time.perf_counter() - t0:.1f} s)")
    phases = 2 if end_to_end else 1
    with progress_bar() as progress:
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
        from ..scan import scan_faults

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
    try:
        path = report.save(out)
    except (ValueError, OSError) as exc:  # the directory changed during the scan
        _fail(f"could not write the scan into {out}: {exc}")
    console.print(f"wrote {path}/: " + ", ".join(n for n in report.OUTPUT_FILES if (path / n).exists()))
