"""`hwnoise formats`: every linear weight of a model under each number format."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from .common import DeviceMapOption, DeviceOption, DtypeOption
from .common import _check_out, _fail, _load_model, _print_wide, app, console, progress_bar


@app.command("formats")
def formats_command(
    model: str = typer.Argument("default", help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id."),
    formats: str = typer.Option(None, "--formats", "-f", help="Comma-separated formats (default: a survey of 4- to 16-bit formats). See --list."),
    out: Path = typer.Option(Path("hwnoise-out/formats"), "--out", "-o", help="Output directory for formats.json."),
    list_formats: bool = typer.Option(False, "--list", help="List every registered format and exit."),
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
) -> None:
    """Quantize every linear weight of MODEL with each format and compare the errors."""
    from .. import formats as F
    from ..formats.survey import DEFAULT_SURVEY, linear_weights, survey_formats
    from ..io import atomic_write_json

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
    names = list(DEFAULT_SURVEY) if formats is None else [f.strip() for f in formats.split(",") if f.strip()]
    if not names:
        _fail(f"--formats {formats!r} names no format; give comma-separated names, e.g. --formats mxfp4,nvfp4 "
              f"(see --list), or leave it out for the default survey")
    try:
        for n in names:
            F.get(n)
    except ValueError as exc:
        _fail(str(exc))
    from ..io import json_with_keys

    _check_out(out, outputs={"formats.json": json_with_keys("model", "layers", "formats")},
               command="hwnoise formats")

    from ..models import DEFAULT_MODEL_NOTE

    t0 = time.perf_counter()
    net, _ = _load_model(model, device, dtype, device_map)
    weights = linear_weights(net)
    console.print(f"[bold]{model}[/]: {len(weights)} linear layers, "
                  f"{sum(w.numel() for w in weights.values()) / 1e6:.1f}M weights "
                  f"(loaded in {time.perf_counter() - t0:.1f} s)")
    with progress_bar() as progress:
        task = progress.add_task("quantizing", total=len(names) * len(weights))

        def on_progress(label, done, total):
            fmt_name, _, layer = label.partition(" ")
            progress.update(task, advance=1, description=f"{fmt_name:<11} {layer}")

        result = survey_formats(weights, names, on_progress=on_progress)

    table = Table(title=f"Linear weights of {model} under each format")
    for col in ("format", "bits/value", "SQNR dB (all)", "SQNR dB (layer mean)", "SQNR dB (worst layer)",
                "MSE", "rel. error", "deadzone %", "saturation %"):
        table.add_column(col, justify="right" if col != "format" else "left")
    for name, r in result.items():
        table.add_row(name, f"{r['bits_per_value']:.3g}", f"{r['sqnr_db_total']:.2f}", f"{r['sqnr_db_mean']:.2f}",
                      f"{r['sqnr_db_min']:.2f}", f"{r['mse']:.3e}", f"{r['relative_error']:.4f}",
                      f"{100 * r['deadzone_ratio']:.3f}", f"{100 * r['saturation_ratio']:.3f}")
    _print_wide(table)
    note = DEFAULT_MODEL_NOTE if model in ("default", "smollm2") else None
    if note:
        console.print(f"[dim]{note}[/]")
    path = atomic_write_json(out / "formats.json", {
        "model": model, "note": note, "layers": len(weights), "formats": result,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    console.print(f"wrote {path}")
