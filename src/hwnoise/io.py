"""Every file hwnoise writes goes through here: atomic writes (a reader sees the old file or the new
one, never half of one) and the preflight of an output directory.

hwnoise never deletes or replaces anything it did not write: a command writes its own files, each
atomically (a temporary file in the same directory, then ``os.replace``), into a directory that may
hold anything else. ``prepare_out_dir`` refuses an output path that cannot work (an existing file, a
read-only directory) before any work starts, so a long scan does not fail at its last step.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import tempfile
from pathlib import Path

__all__ = [
    "OutputPathError", "atomic_write_bytes", "atomic_write_figure", "atomic_write_json", "atomic_write_text",
    "figure_bytes", "json_text", "prepare_out_dir",
]


class OutputPathError(ValueError):
    """An output path hwnoise cannot write into (an existing file, a read-only directory)."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create missing parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value):
    """JSON has no inf/nan: write them as strings a reader can parse back with float()."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def json_text(data) -> str:
    """The JSON text hwnoise writes: indented, inf/nan as strings, a final newline."""
    return json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as JSON (see ``json_text``) to ``path`` atomically."""
    return atomic_write_text(path, json_text(data))


def figure_bytes(fig, format: str = "png") -> bytes:
    """A matplotlib Figure rendered to bytes (no file is touched)."""
    buf = _io.BytesIO()
    fig.savefig(buf, format=format)
    return buf.getvalue()


def atomic_write_figure(path: str | os.PathLike, fig, format: str = "png") -> Path:
    """Render a matplotlib Figure and write it to ``path`` atomically."""
    return atomic_write_bytes(path, figure_bytes(fig, format))


def _probe_writable(directory: Path) -> None:
    """Create and remove a temporary file: the only honest test (os.access says yes to root on a
    read-only mount and knows nothing of quotas or ACLs)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hwnoise-probe-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def prepare_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check, before any work starts, that ``path`` can be an output directory: it is a directory
    hwnoise can write into, or it does not exist yet and its nearest existing parent is one.
    Nothing is created or removed (a command that fails before writing leaves no trace).
    Raises ``OutputPathError`` (a ValueError) naming the path and what is accepted."""
    path = Path(path)
    accepted = "give a directory (existing or new) that you can write into"
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is an existing file, not a directory; hwnoise writes "
                              f"several files into a directory and will not replace a file: {accepted}")
    probe = path
    while not probe.exists():  # the directory that would hold the new one
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a "
                              f"directory; {accepted}")
    try:
        _probe_writable(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = "is" if probe == path else f"would be created in {str(probe)!r}, which is"
        raise OutputPathError(f"{what} {str(path)!r} {where} not writable ({reason}); {accepted}") from None
    return path
