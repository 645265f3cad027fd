"""Tasks that run with no hub access: an offline GSM8K (lm-eval's own gsm8k task on a local file),
and the task manager that finds it beside the user's own task folders.

``gsm8k_local`` is lm-eval's installed ``tasks/gsm8k/gsm8k.yaml`` (prompt ``Question: ...\\nAnswer:``,
5-shot, the ``strict-match`` and ``flexible-extract`` filters, ``exact_match``) included by path,
with only the data source replaced: ``dataset_path: json`` and ``data_files`` pointing at a local
GSM8K-format JSONL (``question`` and ``answer`` per line, the answer ending in ``#### N``). The
few-shot examples come from ``train.jsonl`` beside the test file when there is one (lm-eval's
``fewshot_split: train``, as upstream), else from the test file itself (lm-eval's sampler then
never shows a document as its own example).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

from ...io import atomic_write_text

__all__ = ["GSM8K_ENV", "GSM8K_TASK", "build_task_manager", "data_files_sha256", "gsm8k_task_yaml",
           "resolve_gsm8k_path", "write_gsm8k_task"]

GSM8K_TASK = "gsm8k_local"
GSM8K_ENV = "HWNOISE_GSM8K"  # the default --gsm8k-path
_SHARED_GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")


def upstream_gsm8k_yaml() -> Path:
    """The gsm8k task definition installed with lm-eval (the prompt, filters and metric we reuse)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's gsm8k task is not at {path}; install lm-eval==0.4.13 (pip install 'hwnoise[lm-eval]')")
    return path


def resolve_gsm8k_path(path: str | os.PathLike | None = None) -> Path | None:
    """The local GSM8K test file: ``path``, else ``$HWNOISE_GSM8K``, else the project's shared copy
    when it exists; None when there is none. A given path that is not a file is a FileNotFoundError.

    Example:
        >>> resolve_gsm8k_path("/work/shared/data/gsm8k/test.jsonl")  # doctest: +SKIP
        PosixPath('/work/shared/data/gsm8k/test.jsonl')
    """
    given = path if path is not None else os.environ.get(GSM8K_ENV) or None
    if given is None:
        return _SHARED_GSM8K if _SHARED_GSM8K.is_file() else None
    p = Path(given).expanduser().resolve()
    if not p.is_file():
        where = "--gsm8k-path" if path is not None else f"${GSM8K_ENV}"
        raise FileNotFoundError(f"{where} {str(given)!r} is not a file; give a GSM8K-format .jsonl "
                                f"(one {{\"question\": ..., \"answer\": \"... #### N\"}} per line)")
    return p


def gsm8k_task_yaml(test_path: str | os.PathLike, train_path: str | os.PathLike | None = None,
                    task: str = GSM8K_TASK) -> str:
    """The YAML of an offline GSM8K task: lm-eval's gsm8k.yaml with a local data source.

    Args:
        test_path: the GSM8K-format JSONL whose documents are evaluated.
        train_path: few-shot examples; default ``train.jsonl`` beside ``test_path`` if it exists,
            else the test file itself.
        task: the task's name.

    Example:
        >>> print(gsm8k_task_yaml("/data/gsm8k/test.jsonl"))  # doctest: +SKIP
        include: .../lm_eval/tasks/gsm8k/gsm8k.yaml
        task: gsm8k_local
        dataset_path: json
        ...
    """
    test = Path(test_path).expanduser().resolve()
    if train_path is None:
        sibling = test.with_name("train.jsonl")
        train = sibling if sibling.is_file() and sibling != test else None
    else:
        train = Path(train_path).expanduser().resolve()
    files = {"test": str(test)}
    config = {
        "include": str(upstream_gsm8k_yaml()),
        "task": task,
        "tag": [],  # upstream's tag (math_word_problems) would make this task part of that tag's group
        "dataset_path": "json",
        "dataset_name": None,
        "test_split": "test",
    }
    if train is not None:
        files["train"] = str(train)
        config.update(training_split="train", fewshot_split="train")
    else:
        config.update(training_split=None, fewshot_split="test")
    config["dataset_kwargs"] = {"data_files": files}
    header = ("# lm-eval's gsm8k task (prompt, few-shot, filters, exact_match) on local files; written by hwnoise\n"
              "# (hwnoise.integrations.lm_eval.gsm8k_task_yaml). Usable with plain lm-eval: --include_path THIS_DIR\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def write_gsm8k_task(directory: str | os.PathLike, test_path, train_path=None, task: str = GSM8K_TASK) -> Path:
    """Write ``<directory>/<task>.yaml`` (see ``gsm8k_task_yaml``) atomically; return its path."""
    path = Path(directory) / f"{task}.yaml"
    atomic_write_text(path, gsm8k_task_yaml(test_path, train_path, task))
    return path


def build_task_manager(include_paths=(), names=()):
    """An lm-eval ``TaskManager`` that also scans ``include_paths`` (folders of task YAMLs).

    When every one of ``names`` is defined in ``include_paths`` the manager indexes those folders
    only: indexing lm-eval's ~15,000 bundled task files takes seconds to tens of seconds, and local
    tasks (gsm8k_local, the user's own) do not need it. Otherwise the bundled tasks are indexed too.

    Example:
        >>> tm = build_task_manager(["my_tasks/"], names=["my_task"])  # doctest: +SKIP
    """
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser().resolve()) for p in include_paths]
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p!r} is not a directory; give a folder of lm-eval task YAMLs")
    if paths and names:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in set(local.all_tasks) for n in names):
            return local
    return TaskManager(include_path=paths or None)


def data_files_sha256(config: dict) -> dict[str, str]:
    """sha256 of each local file a task config reads (``dataset_kwargs.data_files``): part of a run's
    identity, since the same path may hold other documents tomorrow."""
    files = ((config or {}).get("dataset_kwargs") or {}).get("data_files") or {}
    if isinstance(files, (str, os.PathLike)):
        files = {"data": files}
    out = {}
    for split, value in (files.items() if isinstance(files, dict) else enumerate(files)):
        for i, f in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            p = Path(str(f)).expanduser()
            if p.is_file():
                out[f"{split}[{i}]" if isinstance(value, (list, tuple)) else str(split)] = \
                    hashlib.sha256(p.read_bytes()).hexdigest()
    return out
