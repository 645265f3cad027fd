"""What every `hwnoise` command shares: the typer app, the console, model loading, error exits."""

from __future__ import annotations

from typing import Annotated

import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _quiet_third_party_logs() -> None:
    """torchao logs missing CUDA extensions and torch logs pytree deprecations on import: noise
    on a CPU machine; transformers prints loading bars and warnings over the CLI's own progress.
    The CLI is an application, so it may set these levels (the library does not)."""
    import logging

    import transformers

    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # TRL toggles checkpointing around each generation through transformers' deprecated aliases
    # (hwnoise's own arguments use the new names): 24 warnings a run that a user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
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
    if device_map == "auto":
        import torch

        if not torch.cuda.is_available():
            # accelerate would put every weight on the CPU without a word: say so, and load as --device cpu.
            _note("--device-map auto spreads a model over the visible GPUs, and this machine has none (no CUDA "
                  "device): the whole model loads on the CPU, as with --device-map none --device cpu")
            device_map, device = "none", "cpu"
    with console.status(f"loading {model} ..."):
        try:
            return load(model, device=device, dtype=dtype, device_map=None if device_map == "none" else device_map)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            _fail(str(exc))


def _fail(message: str) -> None:
    """Print ``message`` as an error and exit 2. The message is text, not rich markup: op lists
    (``@output[linear]``) and paths keep their brackets."""
    from rich.markup import escape

    # soft_wrap: a long path or spec is never broken by an inserted newline (copy-paste, grep)
    console.print(f"[bold red]error:[/] {escape(str(message))}", soft_wrap=True)
    raise typer.Exit(code=2)


def _check_settings_before_loading(model: str, specs: list[str], seed: int) -> None:
    """Every setting against the model's structure (built on the meta device: no weight is read),
    so that a layer range, exclude or plan that does not fit fails before the load and the clean
    pass, not after them. A model that cannot be built so is left to the load to report."""
    from ..eval.core import check_settings
    from ..models import meta_model

    if all(spec == "clean" for spec in specs):
        return
    _quiet_third_party_logs()
    try:
        skeleton = meta_model(model)
    except Exception:  # noqa: BLE001  (a bad model spec: the load names the problem)
        return
    try:
        check_settings(skeleton, specs, seed)
    except ValueError as exc:
        _fail(str(exc))


def _note(message: str) -> None:
    """A one-line note to the user (plain text: brackets are kept)."""
    from rich.markup import escape

    console.print(f"[yellow]note:[/] {escape(str(message))}", soft_wrap=True)


class PlainProgress:
    """What a long command shows when its output is not a terminal (piped, ``nohup``, a log file):
    plain lines instead of a bar that would print nothing until the end. The subset of rich's
    ``Progress`` the commands use (``add_task``, ``update``, a context manager). A line is printed when
    a task starts, each time it passes another tenth of its total (or another ``every`` seconds when
    its total is unknown or its steps are slow), and when it completes."""

    def __init__(self, out: Console, every: float = 10.0):
        self.console, self.every = out, every
        self._tasks: list[dict] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self._tasks.append({"description": description, "total": total, "completed": completed,
                            "start": time.monotonic(), "printed_at": None, "done": False,
                            "tenth": int(10 * completed / total) if total else -1})
        self._line(self._tasks[-1])
        return len(self._tasks) - 1

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_) -> None:
        t = self._tasks[task_id]
        before = t["completed"]
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if t["completed"] == before or t["done"]:
            return
        total = t["total"]
        done = bool(total) and t["completed"] >= total
        tenth = int(10 * t["completed"] / total) if total else -1
        now = time.monotonic()
        if done or tenth > t["tenth"] or now - t["printed_at"] >= self.every:
            t["tenth"], t["done"] = max(tenth, t["tenth"]), done
            self._line(t)

    def _line(self, t: dict) -> None:
        t["printed_at"] = time.monotonic()
        elapsed = int(t["printed_at"] - t["start"])
        count = f"{t['completed']:g}"
        if t["total"]:
            count += f"/{t['total']:g} ({100 * t['completed'] / t['total']:.0f} %)"
        self.console.print(f"{t['description'].strip()}: {count} {elapsed // 60}:{elapsed % 60:02d}",
                           markup=False, highlight=False, soft_wrap=True)


def progress_bar(transient: bool = True) -> Progress | PlainProgress:
    """The progress every long command shows: a rich bar on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)


def _print_wide(renderable, width: int = 150) -> None:
    """Piped or logged output gets 80 columns from rich: too narrow for eight columns of numbers."""
    if console.is_terminal:
        console.print(renderable)
        return
    saved = console.width
    console.width = max(saved, width)
    try:
        console.print(renderable)
    finally:
        console.width = saved


def _check_out(path, what: str = "--out", outputs=None, command: str | None = None) -> None:
    """The output directory of a command, checked before any work starts (exit 2 with a message):
    one that can be written, holding no file named like one of the command's ``outputs`` that an
    earlier run of it did not write (``hwnoise.io.check_outputs``, the one output-folder policy)."""
    from ..io import OutputPathError, check_outputs, prepare_out_dir

    try:
        prepare_out_dir(path, what=what)
        if outputs:
            check_outputs(path, outputs, command or "this command", what=what)
    except OutputPathError as exc:
        _fail(str(exc))
