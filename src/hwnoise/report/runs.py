"""Moved: the runs table of ``hwnoise report`` lives in ``hwnoise.rl.runs`` (run summaries sit with
``rl``, which writes the runs). The old names resolve there, with a deprecation warning, until
hwnoise 0.3; importing this module does not import ``hwnoise.rl``."""

from ..compat import module_aliases

_MOVED = ("RUNS_SCHEMA_VERSION", "COLUMNS", "load_run", "describe_config", "summarize_runs", "runs_markdown",
          "runs_table", "write_runs_report")

__all__: list[str] = []
__getattr__ = module_aliases(__name__, {name: f"hwnoise.rl.runs:{name}" for name in _MOVED})
