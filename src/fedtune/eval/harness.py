"""lm-evaluation-harness tasks on a run's base model and its adapter (``fedtune eval --tasks``).

The model is loaded once as the run trained it (:func:`fedtune.inference.load_run`: dtype,
RoPE scaling) and handed to lm-eval's ``HFLM`` as a loaded peft model, unmerged; the base
scores come from the same model with the adapter disabled. Tasks come from lm-eval's own
folder and ``include_path`` (default: fedtune's ``eval/tasks/``). A task YAML there whose
``dataset_kwargs.data_files`` are relative paths has them read beside the YAML (lm-eval
would read them from the current folder), so a task folder travels whole. Offline: local
datasets only, unless the hub cache holds a task's data. Writes ``eval/lm_eval.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.eval.generate import adapter_off
from fedtune.inference import load_run
from fedtune.io import write_text_atomic
from fedtune.rundir import RunDir

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"


def _absolute_data_files(files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list or a split -> path(s) map) with relative paths made absolute."""
    if isinstance(files, str):
        return files if Path(files).is_absolute() or "://" in files else str(folder / files)
    if isinstance(files, list):
        return [_absolute_data_files(f, folder) for f in files]
    if isinstance(files, dict):
        return {k: _absolute_data_files(v, folder) for k, v in files.items()}
    return files


@dataclass(frozen=True)
class TaskSet:
    """Checked tasks, ready to run: the names, lm-eval's TaskManager, the specs it is given."""

    names: tuple[str, ...]
    include_path: Path
    manager: Any
    specs: list[str | dict[str, Any]]


def prepare_tasks(names: Sequence[str], include_path: Path | None = None) -> TaskSet:
    """Check ``names`` (before any model loads) and resolve them; see :func:`task_specs`."""
    if not names:
        raise FedtuneError("--tasks: no task named")
    folder = include_path or TASKS_DIR
    manager, specs = task_specs(names, folder)
    return TaskSet(tuple(names), folder, manager, specs)


def task_specs(names: Sequence[str], include_path: Path) -> tuple[Any, list[str | dict[str, Any]]]:
    """lm-eval's TaskManager over ``include_path`` and the task specs to run.

    A task whose YAML sits under ``include_path`` and names local ``data_files`` becomes an
    inline config (its YAML, paths made absolute); others stay names. An unknown name is a
    FedtuneError naming it and where it was looked for.
    """
    try:
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise FedtuneError("--tasks needs lm-evaluation-harness: pip install 'fedtune[eval]'") from None
    if not include_path.is_dir():
        raise FedtuneError(f"--include-path {include_path}: not a folder")
    # indexing lm-eval's own thousands of task YAMLs takes seconds: only when a name needs it
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FedtuneError(
            f"unknown lm-eval task(s) {', '.join(unknown)} (not in lm-eval's tasks nor in {include_path})"
        )
    specs: list[str | dict[str, Any]] = []
    root = include_path.resolve()
    for name in names:
        entry = manager.task_index[name]
        yaml_path = Path(entry.yaml_path) if getattr(entry, "yaml_path", None) else None
        if yaml_path is None or root not in yaml_path.resolve().parents:
            specs.append(name)
            continue
        cfg = load_yaml(yaml_path)
        files = cfg.get("dataset_kwargs", {}).get("data_files")
        if files is not None:
            cfg["dataset_kwargs"] = {
                **cfg["dataset_kwargs"],
                "data_files": _absolute_data_files(files, yaml_path.parent),
            }
        specs.append(cfg)
    return manager, specs


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, metric): ``{"task", "metric", "base", "adapter"}``.

    Standard errors, aliases and lm-eval's ``sample_len`` (examples run) are left out.
    """
    rows = []
    for task, metrics in results["adapter"].items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, int | float):
                continue
            base = results["base"].get(task, {}).get(key)
            rows.append({"task": task, "metric": key, "base": base, "adapter": value})
    return rows


def run_tasks(
    run_dir: str | Path, tasks: TaskSet, *, limit: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Run ``tasks`` on adapter and base; write and return ``lm_eval.json``'s content."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    run = RunDir.open(run_dir)
    manager, specs, names = tasks.manager, tasks.specs, tasks.names
    loaded = load_run(run.path)
    model = loaded.model
    assert model is not None
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    results: dict[str, Any] = {}
    for variant in ("adapter", "base"):
        log.info("lm-eval: %s on %s", ", ".join(names), variant)
        try:
            with adapter_off(model, variant == "base"):
                out = simple_evaluate(
                    model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=False
                )
        except (ConnectionError, FileNotFoundError) as err:  # datasets' offline / missing-file errors
            raise FedtuneError(
                f"lm-eval task(s) {', '.join(names)}: a dataset could not be loaded "
                f"({type(err).__name__}: {err}); offline, a task needs local data "
                "(dataset_path: json + dataset_kwargs.data_files) or the datasets cache"
            ) from None
        results[variant] = out["results"] if out else {}
    doc = {
        "run": str(run.path),
        "tasks": list(names),
        "include_path": str(tasks.include_path),
        "limit": limit,
        "results": results,
        "summary": summary_rows(results),
    }
    write_text_atomic(run.lm_eval_file, json.dumps(doc, indent=2, default=str) + "\n")
    return doc
