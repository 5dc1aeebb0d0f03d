"""Tasks of lm-evaluation-harness (``lm_eval``) on a model already loaded in this process.

``lm_eval.models.huggingface.HFLM`` accepts a model object and its tokenizer, so the model
``automodel evaluate`` loaded (an adapter on its base included) is scored as loaded, without a
second load from disk. Tasks are found by lm-eval's ``TaskManager``: its built-in task catalogue
plus the task YAMLs under ``include_path``; a task whose YAML reads local files (``dataset_path:
json`` with ``data_files``) needs no network. lm-eval is an optional extra
(``pip install 'automodel-cli[lmeval]'``).
"""

from __future__ import annotations

from typing import Any

from automodel_cli.errors import UserError, did_you_mean

INSTALL_HINT = "Install it with `pip install 'automodel-cli[lmeval]'` (lm-evaluation-harness)."


def task_manager(include_path: str | None) -> Any:
    """lm-eval's ``TaskManager`` with the task YAMLs under ``include_path``; ``UserError`` when
    lm-eval is not installed or the directory does not exist."""
    import os

    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness (the `lm_eval` package), which is not installed.",
                        INSTALL_HINT) from None
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory.",
                        "Pass the directory that holds your task YAML files.")
    return TaskManager(include_path=include_path)


def check_tasks(manager: Any, tasks: list[str], include_path: str | None) -> None:
    """Every task (or group) name must be known to ``manager``: the unknown ones are reported
    together, each with its closest known names."""
    known = list(manager.all_tasks)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if not unknown:
        return
    described = "; ".join(f"`{task}`{did_you_mean(task, known)}" for task in unknown)
    where = f" (nor in the YAMLs under {include_path})" if include_path else ""
    raise UserError(f"Unknown lm-eval task{'s' if len(unknown) > 1 else ''}{where}: {described}",
                    "Check the names (`lm_eval ls tasks` lists them), or define the task in a YAML file and pass "
                    "its directory with --include-path DIR.")


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], manager: Any, *, batch_size: int,
              limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Each task's metrics (lm-eval's names, such as ``acc,none``) for ``model``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=harness, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False)
    return {task: {name: value for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in (results or {}).get("results", {}).items()}
