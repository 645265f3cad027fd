"""What every `hwnoise` command shares: the typer app, the console, model loading, error exits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _quiet_third_party_logs() -> None:
    """torchao logs missing CUDA extensions and torch logs pytree deprecations on import: noise
    on a CPU machine; transformers prints loading bars and warnings over the CLI's own progress.
    The CLI is an application, so it may set these levels (the library does not)."""
    import logging

    import transformers

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


app = typer.Typer(
    help="Emulate number formats and hardware noise, find the layers they hurt, train them robust.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _check_device(value: str) -> str:
    """--device: a name resolve_device accepts and a device that exists here, else exit 2 naming those that do."""
    from ..devices import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        _fail(str(exc))
    return value


def _check_dtype(value: str) -> str:
    from ..devices import resolve_dtype

    try:
        resolve_dtype(value)
    except ValueError as exc:
        _fail(str(exc))
    return value


def _check_device_map(value: str) -> str:
    if value not in ("none", "auto"):
        _fail(f"--device-map {value!r} is not accepted; expected 'auto' (spread over the visible GPUs) or 'none'")
    return value


# One definition of the device options for every command that loads a model (train: config keys).
DeviceOption = Annotated[str, typer.Option(
    "--device", callback=_check_device,
    help="'auto' (CUDA when present, else the CPU), 'cpu', 'cuda' or 'cuda:N'.")]
DtypeOption = Annotated[str, typer.Option(
    "--dtype", callback=_check_dtype,
    help="Weights' dtype: 'auto' (the checkpoint's; fp32 for the bundled model), 'bf16', 'fp16' or 'fp32'.")]
DeviceMapOption = Annotated[str, typer.Option(
    "--device-map", callback=_check_device_map,
    help="'auto': spread a model too big for one GPU over the visible GPUs (accelerate; --device is then "
         "ignored). 'none': the whole model on --device.")]


def _load_model(model: str, device: str = "auto", dtype: str = "auto", device_map: str = "none"):
    """(model, tokenizer) on ``device`` in ``dtype``, with a spinner and quiet third-party logs; a bad spec
    exits with code 2."""
    from ..models import load

    _quiet_third_party_logs()
    with console.status(f"loading {model} ..."):
        try:
            return load(model, device=device, dtype=dtype, device_map=None if device_map == "none" else device_map)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def progress_bar(transient: bool = True) -> Progress:
    """The progress bar every long command shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)
