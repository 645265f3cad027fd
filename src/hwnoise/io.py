"""Every file hwnoise writes goes through here: atomic writes (a reader sees the old file or the new
one, never half of one) and the preflight of an output directory.

hwnoise never deletes or replaces anything it did not write: a command writes its own files, each
atomically (a temporary file in the same directory, then ``os.replace``), into a directory that may
hold anything else. ``prepare_out_dir`` refuses an output path that cannot work (an existing file, a
read-only directory) before any work starts, so a long scan does not fail at its last step.

The output-folder policy, one for every command (``check_outputs``): a command names its outputs,
each with a test that tells a file an earlier run of the same command wrote (``json_with_keys``,
``jsonl_with_keys``, ``text_starting``, ``is_hwnoise_png``). A file in the folder that has one of those
names but fails the test (a user's ``README.md``, another command's ``run.json``) is refused before
any work starts, naming the file; every other file in the folder is left alone.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import tempfile
from pathlib import Path

__all__ = [
    "OutputPathError", "PNG_SOFTWARE", "atomic_write_bytes", "atomic_write_figure", "atomic_write_json",
    "atomic_write_text", "check_outputs", "figure_bytes", "is_hwnoise_png", "json_text", "json_with_keys",
    "is_directory", "jsonl_with_keys", "prepare_out_dir", "text_starting",
]

# The PNG "Software" text chunk of every figure hwnoise writes: how a rerun knows the file is its own.
PNG_SOFTWARE = "hwnoise"


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
    extra = {"metadata": {"Software": PNG_SOFTWARE}} if format == "png" else {}
    fig.savefig(buf, format=format, **extra)
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


# -- the output-folder policy --------------------------------------------------------------------


def json_with_keys(*keys: str):
    """A test for ``check_outputs``: the file is a JSON object holding every one of ``keys``.

    Example:
        >>> is_eval_json = json_with_keys("settings", "comparisons")
    """
    def test(path: Path) -> bool:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    test.__doc__ = f"a JSON object with {', '.join(keys)}"
    return test


def jsonl_with_keys(*keys: str):
    """A test for ``check_outputs``: the file is empty or its first line is a JSON object holding ``keys``.

    Example:
        >>> is_records = jsonl_with_keys("setting", "problem_id")
    """
    def test(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except (OSError, ValueError):
            return False
        if not first.strip():
            return Path(path).stat().st_size == len(first.encode())  # empty (or one blank line) only
        try:
            data = json.loads(first)
        except ValueError:
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    test.__doc__ = f"JSON lines with {', '.join(keys)}"
    return test


def text_starting(prefix: str):
    """A test for ``check_outputs``: a UTF-8 text file that starts with ``prefix``.

    Example:
        >>> is_runs_md = text_starting("# Runs (")
    """
    def test(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read(len(prefix)) == prefix
        except (OSError, ValueError):
            return False

    test.__doc__ = f"text starting {prefix!r}"
    return test


def is_hwnoise_png(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PNG whose Software text chunk says hwnoise wrote it (``figure_bytes``).

    Example:
        >>> is_hwnoise_png("no-such.png")
        False
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + PNG_SOFTWARE.encode() in head


def is_directory(path: Path) -> bool:
    """A test for ``check_outputs``: a directory (a command's own sub-folder, e.g. train's checkpoints)."""
    return Path(path).is_dir()


def check_outputs(out: str | os.PathLike, outputs, command: str, what: str = "--out") -> None:
    """The output-folder policy: refuse, before any work, a folder holding a file named like one of
    ``command``'s outputs that an earlier run of ``command`` did not write (it would be replaced).

    Args:
        out: the output folder (it need not exist yet).
        outputs: ``{name: test}``; ``test(path)`` is True for a file an earlier run of ``command``
            wrote (``json_with_keys``, ``jsonl_with_keys``, ``text_starting``, ``is_hwnoise_png``,
            ``is_directory``). Files with other names are never touched and never checked.
        command: the command, for the message (``"hwnoise eval"``).
        what: the option that named ``out``.

    Raises ``OutputPathError`` naming each such file and the ways out.

    Example:
        >>> check_outputs("no-such-dir", {"eval.json": json_with_keys("settings")}, "hwnoise eval")
    """
    out = Path(out)
    if not out.is_dir():
        return
    foreign = []
    for name, test in outputs.items():
        path = out / name
        if path.exists() and not test(path):
            foreign.append(name)
    if foreign:
        names = ", ".join(repr(n) for n in foreign)
        raise OutputPathError(f"{what} {str(out)!r} holds {names}, which {command} writes but which no earlier run "
                              f"of {command} wrote (a file of yours, or another command's); it would be replaced. "
                              f"Give another {what}, or move {'it' if len(foreign) == 1 else 'them'} away")
