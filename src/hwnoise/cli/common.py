"""What every `hwnoise` command shares: the typer app, the console, model loading, error exits."""

from __future__ import annotations

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


def _load_model(model: str):
    """(model, tokenizer) with a spinner and quiet third-party logs; a bad spec exits with code 2."""
    from ..models import load

    _quiet_third_party_logs()
    with console.status(f"loading {model} ..."):
        try:
            return load(model)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def progress_bar(transient: bool = True) -> Progress:
    """The progress bar every long command shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)
