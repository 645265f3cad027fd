"""Output files (issue 13, "--out deletes the user's files"): hwnoise writes only its own files, each
atomically, into a directory that may hold anything else; an output path that cannot work is refused
before any work starts. Plus the CLI's other newcomer defects of the same audit: silently accepted
options, tracebacks instead of messages, progress when not on a terminal, names at 80 columns."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, tiny_llama  # noqa: E402

from hwnoise.cli import app  # noqa: E402

runner = CliRunner()
SCAN_FILES = {"scan.html", "scan.json", "scan_deadzone.png", "scan_saturation.png", "scan_sqnr.png",
              "sigma_multipliers.json"}


def text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture
def tiny(monkeypatch):
    """`load()` returns a tiny Llama and a byte tokenizer: the CLI path without the bundled model."""
    import hwnoise.models

    monkeypatch.setenv("HWNOISE_COMPILE", "0")
    model = tiny_llama()
    monkeypatch.setattr(hwnoise.models, "load", lambda spec, **kw: (model, ByteTokenizer()))
    return model


@pytest.fixture
def no_load(monkeypatch):
    """The model must not load: the command has to fail before any work."""
    import hwnoise.models

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded when --out cannot be written")

    monkeypatch.setattr(hwnoise.models, "load", refuse)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody here can create files in: chmod 0555 for an ordinary user; as root (who
    writes anywhere) sysfs, which refuses new files even to root."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    d = Path("/sys/kernel")
    try:
        fd, p = tempfile.mkstemp(dir=d)
    except OSError:
        yield d
        return
    os.close(fd)
    os.unlink(p)
    pytest.skip("running as root and no read-only directory found")


def user_files(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("my notes")
    (root / "sub").mkdir()
    (root / "sub" / "data.csv").write_text("1,2,3")
    return {"notes.txt": b"my notes", "sub/data.csv": b"1,2,3"}


def assert_kept(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, f"{name} was changed or deleted"


def scan(out, *extra):
    return runner.invoke(app, ["scan", "tiny", "--no-end-to-end", "--out", str(out), *map(str, extra)])


# --- --out keeps what hwnoise did not write -----------------------------------------------------


def test_scan_out_keeps_unrelated_files(tiny, tmp_path):
    out = tmp_path / "results"
    mine = user_files(out)
    result = scan(out)
    assert result.exit_code == 0, result.output
    assert_kept(out, mine)
    assert SCAN_FILES <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no .old-* or temporary folders
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert "notes.txt" not in result.output  # the summary lists what the scan wrote, only that


def test_scan_out_current_directory_keeps_its_files(tiny, tmp_path, monkeypatch):
    mine = user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = scan(".")
    assert result.exit_code == 0, result.output
    assert_kept(tmp_path, mine)
    assert (tmp_path / "scan.json").exists()


def test_scan_save_keeps_unrelated_files_and_replaces_its_own(tiny, tmp_path):
    import hwnoise as hn

    out = tmp_path / "o"
    mine = user_files(out)
    report = hn.scan(tiny, ByteTokenizer(), texts=["some calibration text"], format="mxfp4", end_to_end=False)
    (out / "scan.json").write_text("an older scan")
    (out / "scan_end_to_end.png").write_bytes(b"stale plot of an earlier scan")
    report.save(out)
    assert_kept(out, mine)
    assert json.loads((out / "scan.json").read_text())["format"] == "mxfp4"
    # not written by this save, so not touched (issue 20 item 3: a save deletes nothing it does not write)
    assert (out / "scan_end_to_end.png").read_bytes() == b"stale plot of an earlier scan"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_readme_scan_and_formats_examples_share_out_without_deleting_each_other(tiny, tmp_path):
    out = tmp_path / "results"
    assert runner.invoke(app, ["formats", "tiny", "--formats", "mxfp4,nvfp4", "--out", str(out)]).exit_code == 0
    formats_json = (out / "formats.json").read_bytes()
    assert scan(out).exit_code == 0
    assert (out / "formats.json").read_bytes() == formats_json
    scan_json = (out / "scan.json").read_bytes()
    assert runner.invoke(app, ["formats", "tiny", "--formats", "mxfp8", "--out", str(out)]).exit_code == 0
    assert (out / "scan.json").read_bytes() == scan_json


def test_scan_interrupted_while_writing_leaves_no_temporary_file(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert scan(out).exit_code == 0
    mine = user_files(out / "mine")
    real, calls = os.replace, []

    def fail_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(src, dst)

    import hwnoise.io as hio

    monkeypatch.setattr(hio.os, "replace", fail_third)
    assert scan(out, "--format", "nvfp4").exit_code != 0
    assert_kept(out / "mine", mine)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    for name in SCAN_FILES:  # every file whole: the old one or the new one
        assert (out / name).stat().st_size > 0


# --- an output path that cannot work is refused before any work -----------------------------------


@pytest.mark.parametrize("command", [
    ["scan", "tiny"],
    ["formats", "tiny"],
    ["eval", "tiny", "--data", "arith", "--n", "2"],
    ["report", "run-a"],
])
def test_out_existing_file_is_an_error_before_any_work(command, tmp_path, no_load):
    f = tmp_path / "f.txt"
    f.write_text("precious")
    result = runner.invoke(app, [*command, "--out", str(f)])
    assert result.exit_code == 2, result.output
    assert "f.txt" in text(result) and "existing file" in text(result) and "directory" in text(result)
    assert f.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("command", [["scan", "tiny"], ["formats", "tiny"], ["eval", "tiny", "--n", "2"],
                                     ["report", "run-a"]])
def test_out_read_only_directory_is_an_error_before_any_work(command, read_only_dir, no_load):
    result = runner.invoke(app, [*command, "--out", str(read_only_dir / "new")])
    assert result.exit_code == 2, result.output
    assert "not writable" in text(result) and str(read_only_dir) in text(result)


def test_out_under_a_file_is_an_error(tmp_path, no_load):
    (tmp_path / "f.txt").write_text("x")
    result = runner.invoke(app, ["scan", "tiny", "--out", str(tmp_path / "f.txt" / "sub")])
    assert result.exit_code == 2 and "is a file" in text(result)


def test_scan_save_to_an_existing_file_is_a_clear_error(tiny, tmp_path):
    import hwnoise as hn

    f = tmp_path / "f.txt"
    f.write_text("precious")
    report = hn.scan(tiny, ByteTokenizer(), texts=["some calibration text"], format="mxfp4", end_to_end=False)
    with pytest.raises(ValueError, match="existing file"):
        report.save(f)
    assert f.read_text() == "precious"


def test_prepare_out_dir_creates_nothing(tmp_path):
    import hwnoise.io as hio

    assert hio.prepare_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_leave_ordinary_files_and_no_temporaries(tmp_path):
    import hwnoise.io as hio

    hio.atomic_write_json(tmp_path / "d" / "x.json", {"a": float("inf")})
    hio.atomic_write_bytes(tmp_path / "d" / "x.bin", b"\x00\x01")
    assert json.loads((tmp_path / "d" / "x.json").read_text()) == {"a": "inf"}
    assert (tmp_path / "d" / "x.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.bin", "x.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d" / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


# --- silently accepted options -------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--max-length", "0"], ["--max-length 0", ">= 1"]),
    (["--max-length", "-3"], ["--max-length -3", ">= 1"]),
    (["--top", "-1"], ["--top -1", ">= 1"]),
    (["--top", "0"], ["--top 0", ">= 1"]),
])
def test_scan_max_length_zero_and_negative_top_are_refused(args, words, tmp_path, no_load):
    result = runner.invoke(app, ["scan", "tiny", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in text(result)
    assert not (tmp_path / "o").exists()


def test_formats_empty_formats_list_is_refused_and_keeps_the_old_result(tmp_path, no_load):
    out = tmp_path / "o"
    out.mkdir()
    (out / "formats.json").write_text('{"formats": {"mxfp4": {}}}')
    for value in (",", " , ,", ""):
        result = runner.invoke(app, ["formats", "tiny", "--formats", value, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "names no format" in text(result) and "--list" in text(result)
    assert (out / "formats.json").read_text() == '{"formats": {"mxfp4": {}}}'


# --- messages instead of tracebacks -----------------------------------------------------------------


def _a_report(tiny):
    import hwnoise as hn

    return hn.scan(tiny, ByteTokenizer(), texts=["some calibration text"], format="mxfp4", end_to_end=False)


@pytest.mark.parametrize("content, words", [
    ('{"model": "m", "formats": {}}', ["not a hwnoise scan", "'modules'"]),
    ("[1, 2, 3]", ["not a hwnoise scan", "list"]),
    ("not json at all", ["not JSON"]),
    ('{"schema_version": 99, "model": "m", "format": "f", "mode": "weight", "targets": "linear", "thresholds": {}, '
     '"texts": 1, "tokens": 1, "max_length": 1, "clean_loss": 1, "end_to_end": false, "modules": [], "layers": []}',
     ["schema_version 99"]),
])
def test_scan_report_load_on_a_json_that_is_not_a_scan_is_a_clear_error(tmp_path, content, words):
    from hwnoise.scan import ScanReport

    path = tmp_path / "formats.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        ScanReport.load(path)
    for word in words:
        assert word in str(info.value)
    assert "formats.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no scan"):
        ScanReport.load(tmp_path)  # a directory without scan.json


def test_scan_report_compare_with_a_non_report_is_a_clear_error(tiny, tmp_path):
    report = _a_report(tiny)
    with pytest.raises(TypeError, match="compare takes a ScanReport.*got int 42"):
        report.compare(42)
    report.save(tmp_path / "s")
    assert report.compare(tmp_path / "s")["modules_in_both"] == len(report.rows)  # a path is read


# --- progress when not on a terminal ---------------------------------------------------------------


def test_progress_lines_when_stdout_is_not_a_terminal(tiny, tmp_path):
    result = runner.invoke(app, ["formats", "tiny", "--formats", "mxfp4,nvfp4", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "/44 (" in line]  # 22 linears x 2 formats
    assert len(lines) >= 10 and lines[-1].split(": ")[-1].startswith("44/44 (100 %)"), result.output
    result = scan(tmp_path / "s")
    lines = [line for line in result.output.splitlines() if "/22 (" in line]
    assert len(lines) >= 10 and "22/22 (100 %)" in lines[-1], result.output


def test_plain_progress_prints_each_tenth_and_slow_steps():
    from rich.console import Console

    from hwnoise.cli.common import PlainProgress

    console = Console(file=__import__("io").StringIO(), width=200)
    p = PlainProgress(console, every=0.0)
    task = p.add_task("training", total=None)
    for step in range(1, 4):
        p.update(task, completed=step, description=f"step {step}")
    p.update(task, description="no new step: no line")
    lines = console.file.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["training", "step 1", "step 2", "step 3"]
    console = Console(file=__import__("io").StringIO(), width=200)
    p = PlainProgress(console, every=1e9)
    task = p.add_task("quantizing", total=100)
    for _ in range(100):
        p.update(task, advance=1)
    assert len(console.file.getvalue().splitlines()) == 11  # the start and each tenth


# --- the scan table at 80 columns ---------------------------------------------------------------


def test_scan_table_at_80_columns_shows_short_module_names(tiny):
    from rich.console import Console

    report = _a_report(tiny)
    console = Console(file=__import__("io").StringIO(), width=80, color_system=None)
    console.print(report.to_table(5, by="module"))
    out = console.file.getvalue()
    assert "model.…" not in out and "model.layers" not in out
    worst = report.worst(5)
    for r in worst:
        layer = r.name.split(".")[2]
        assert f"L{layer}.{'.'.join(r.name.split('.')[3:])}" in out


def test_formats_table_is_not_cut_to_80_columns_when_piped(tiny, tmp_path):
    result = runner.invoke(app, ["formats", "tiny", "--formats", "mxfp4,nvfp4", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ mxfp4") or line.startswith("│ nvfp4")]
    assert len(rows) == 2 and not any("…" in row for row in rows), result.output


def test_train_out_existing_file_is_an_error_before_any_work(tmp_path, no_load):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nlogging:\n  report_to: [none]\n")
    f = tmp_path / "f.txt"
    f.write_text("precious")
    result = runner.invoke(app, ["train", str(config), "--out", str(f)])
    assert result.exit_code == 2, result.output
    assert "existing file" in text(result) and "f.txt" in text(result)
    assert f.read_text() == "precious"
