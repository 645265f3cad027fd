"""The `hwnoise` command (typer + rich): one module per command, all registered on ``app``."""

from __future__ import annotations

from . import eval, formats, lm_eval, report, scan, train  # noqa: F401  (registers the commands)
from . import mismatch  # noqa: F401  (registers `hwnoise mismatch`)
from .common import app, console

__all__ = ["app", "console"]


@app.command("version")
def version_command() -> None:
    """Print the hwnoise version."""
    from .. import __version__

    console.print(__version__)
