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
    setting: str = typer.Option(None, "--setting", "-s", help="The condition to scan module by module, an emulation spec: 'weights:mxfp4', 'inputs:mxfp4', 'weights:plan.json' (each module in its planned format), or module-level noise 'absolute:1e-3@output' (@input, @weight). Default: weights:mxfp4."),
    fmt: str = typer.Option(None, "--format", "-f", help="Shorthand: --format FMT is --setting weights:FMT (with --where input: inputs:FMT). Number format or spec string (mxfp4, nvfp4, 'mxfp4:rceil'). See `hwnoise formats --list`."),
    where: str = typer.Option(None, "--where", "-w", help="Shorthand with --format: 'weight' (default) quantizes each module's weights (W4A16-style), 'input' its input activations (W16A4-style)."),
    out: Path = typer.Option(Path("hwnoise-out/scan"), "--out", "-o", help="Output directory: scan.json, scan.html, sigma_multipliers.json, PNG plots (written atomically)."),
    faults: bool = typer.Option(False, "--faults", help="Also run the fault scan (gain, kurtosis, instability per decoder layer), bf16 vs --format."),
    texts: Path = typer.Option(None, "--texts", help="Calibration texts: one per line, or GSM8K jsonl (the 'question' field). Default: the built-in set."),
    samples: int = typer.Option(8, "--samples", "-n", help="Number of calibration texts."),
    max_length: int = typer.Option(None, "--max-length", help="Tokens per calibration text (truncated; default 16). More tokens: steadier end-to-end numbers, a longer scan."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--no-end-to-end", help="Measure loss increase and KL with only each module quantized."),
    thresholds: str = typer.Option(None, "--thresholds", help="Problematic when crossed, e.g. 'sqnr_db=20,deadzone_ratio=0.05,saturation_ratio=0.01,relative_error=0.1'."),
    top: int = typer.Option(10, "--top", help="Rows in the table of the worst layers."),
    plan: str = typer.Option(None, "--plan", help="Search a mixed-precision plan (weights:FMT) over these formats, comma-separated, besides the scan's format: e.g. 'bf16' or 'mxfp6_e2m3,mxfp8:rceil,rounding=stochastic,bf16'. Writes plan.json (module -> format), usable as --setting weights:plan.json."),
    target_kl: float = typer.Option(None, "--target-kl", help="Plan target: the cheapest measured plan with KL (nats) at most this. Default: a third of the whole-model KL."),
    target_loss: float = typer.Option(None, "--target-loss", help="Plan target: the cheapest measured plan with loss increase (nats/token) at most this."),
    budget_bits: float = typer.Option(None, "--budget-bits", help="Plan target: the best measured plan within this many effective bits per weight (scale overhead included; bf16 = 16)."),
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
) -> None:
    """Scan MODEL layer by layer under a number format: which modules break, how badly, what to do."""
    from ..scan import SCAN_EXCLUDE, Thresholds, calibration_texts
    from ..scan import scan as run_scan
    from ..scan.calibration import DEFAULT_MAX_LENGTH
    from ..plans import WeightPlan
    from ..scan.core import scan_emulation
    from ..select import select_modules

    try:
        if setting is not None and (fmt is not None or where is not None):
            raise ValueError(f"give --setting {setting} or --format/--where (their shorthand), not both")
        if setting is None and fmt is None and where is not None and where not in ("weight", "input"):
            raise ValueError(f"unknown --where {where!r}; known: weight, input")
        emulation = scan_emulation(setting, fmt, where)  # what cannot be scanned per module is refused here
        scanned = emulation.weight_format or emulation.input_format or f"{emulation.error}@{emulation.where}"
        if faults and not (emulation.weight_format and not isinstance(emulation.weights, WeightPlan)):
            raise ValueError(f"--faults compares bf16 with one weight format (weights:FMT); the setting "
                             f"{emulation.spec!r} is not one")
        threshold_values = Thresholds.coerce(_parse_thresholds(thresholds))
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length {max_length} is not accepted; give tokens per text >= 1 "
                             f"(default {DEFAULT_MAX_LENGTH})")
        if top < 1:
            raise ValueError(f"--top {top} is not accepted; give the number of table rows, >= 1 (default 10)")
        calibration = calibration_texts(texts if texts is None else Path(texts), samples)
        held_out = None
        if plan is not None:
            from ..scan.plan import check_plan_targets, parse_candidates

            if not emulation.weight_format or isinstance(emulation.weights, WeightPlan) \
                    or not end_to_end:
                raise ValueError(f"--plan chooses weight formats from end-to-end effects: it needs one weight format "
                                 f"(--setting weights:FMT, or --format FMT with --where weight) and --end-to-end; "
                                 f"got {emulation.spec!r}")
            parse_candidates(plan, emulation.weight_format)
            check_plan_targets(target_kl, target_loss, budget_bits, plan, emulation.weight_format)
            # Held out: the texts after the calibration ones, as many (none left: no held-out check).
            held_out = calibration_texts(texts if texts is None else Path(texts), None)[len(calibration):
                                                                                        2 * len(calibration)] or None
        elif any(v is not None for v in (target_kl, target_loss, budget_bits)):
            raise ValueError("--target-kl, --target-loss and --budget-bits are plan targets: give --plan too "
                             "(e.g. --plan bf16)")
    except ValueError as exc:
        _fail(str(exc))
    _check_out(out)

    from ..models import DEFAULT_MODEL_NOTE

    def scanned_modules(net):
        return emulation.weights.select(net, exclude=SCAN_EXCLUDE) if emulation.weight_format and \
            isinstance(emulation.weights, WeightPlan) else \
            select_modules(net, emulation.targets, exclude=SCAN_EXCLUDE + emulation.exclude, default_exclude=False)

    from ..models import meta_model

    try:  # the selection against the model's structure (meta device, no weights read) before the load
        skeleton = meta_model(model)
    except Exception:  # noqa: BLE001  (a bad model spec: the load below names the problem)
        skeleton = None
    if skeleton is not None:
        try:
            scanned_modules(skeleton)
        except ValueError as exc:  # a layer range or plan that does not fit this model
            _fail(str(exc))
    t0 = time.perf_counter()
    net, tokenizer = _load_model(model, device, dtype, device_map)
    try:
        modules = scanned_modules(net)
    except ValueError as exc:  # a plan for another model
        _fail(str(exc))
    console.print(f"[bold]{model}[/]: {len(modules)} modules under {emulation.spec}, {len(calibration)} calibration "
                  f"texts (loaded in {time.perf_counter() - t0:.1f} s)")
    phases = 2 if end_to_end else 1
    with progress_bar() as progress:
        task = progress.add_task("scanning", total=phases * len(modules))

        def on_progress(label, done, total):
            # The plan search's steps (after the scan's phases) name what runs without advancing the bar.
            phase, _, name = label.partition(" ")
            if phase == "plan":
                sub, _, name = name.partition(" ")
                phase = f"plan {sub}"
            progress.update(task, advance=0 if phase.startswith("plan") else 1, description=f"{phase:<10} {name}")

        try:
            report = run_scan(net, tokenizer, emulation, calibration, thresholds=threshold_values,
                              end_to_end=end_to_end, samples=None, max_length=max_length or DEFAULT_MAX_LENGTH,
                              on_progress=on_progress,
                              model_name=model, plan=plan, target_kl=target_kl, target_loss=target_loss,
                              budget_bits=budget_bits, held_out=held_out if held_out else False)
        except ValueError as exc:
            _fail(str(exc))
    if model in ("default", "smollm2"):
        report.note = DEFAULT_MODEL_NOTE
    if faults:
        from ..scan import scan_faults

        with console.status(f"fault scan: bf16 vs {emulation.weight_format} ..."):
            report.faults = scan_faults(net, tokenizer, calibration, "bf16", emulation.weight_format, samples=None,
                                        max_length=max_length or DEFAULT_MAX_LENGTH)
    console.print(report.to_table(top, by="layer"))
    console.print(report.to_table(top, by="module"))
    if report.faults is not None:
        console.print(report.faults.to_table())
    s = report.to_json()["summary"]
    console.print(f"SQNR {s['sqnr_db_min']:.2f} to {s['sqnr_db_max']:.2f} dB (mean {s['sqnr_db_mean']:.2f}); "
                  f"scan took {report.seconds['total']:.1f} s (metrics {report.seconds['metrics']:.1f} s, "
                  f"end-to-end {report.seconds['end_to_end']:.1f} s)")
    if report.whole_model:
        w = report.whole_model
        console.print(f"Whole model (every scanned module in {scanned} at once): loss increase "
                      f"{w['loss_increase']:+.4f} nats/token, KL {w['kl']:.4f}")
    if report.plan is not None:
        from ..scan.views import plan_table

        console.print(plan_table(report.plan))
        cost = report.plan.cost
        console.print(f"plan search: {cost['forward_passes']['total']} forward passes "
                      f"({', '.join(f'{k} {v}' for k, v in cost['forward_passes'].items() if k != 'total')}), "
                      f"{report.seconds.get('plan', 0):.1f} s")
    console.print(f"[bold]Recommendation:[/] {report.recommendation()}")
    if report.note:
        console.print(f"[dim]{report.note}[/]")
    try:
        path = report.save(out)
    except (ValueError, OSError) as exc:  # the directory changed during the scan
        _fail(f"could not write the scan into {out}: {exc}")
    console.print(f"wrote {path}/: " + ", ".join(report.written))
