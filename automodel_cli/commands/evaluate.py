"""``automodel evaluate RUN_OR_MODEL [key=value]... [--tasks T,...] [--json]``.

Loss and perplexity, generated answers' exact match and contains, and lm-evaluation-harness
tasks for a run's final model, a Hugging Face model or a peft adapter (a sequence classifier:
loss, accuracy and macro F1 or pairwise accuracy), on one process
(``training/model_evaluation.py`` does the work). Options are ``key=value`` overrides of the
command's config (``evaluate.*`` and ``data.*``, ``model.*``), resolved and validated as every
command's are. With ``--json`` stdout holds one JSON object and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Optional

import typer

from automodel_cli.errors import UserError
from automodel_cli.registry import Registries

TARGET_HELP = ("A run directory (its final/ model, with the run's data and settings as defaults), a Hugging Face "
               "model directory or hub id, or a peft adapter directory (evaluated on its recorded base).")
OVERRIDES_HELP = "Settings as key=value: evaluate.max_new_tokens=32, data.path=FILE, data.max_length=512, ..."


def evaluate_command(registries: Registries):
    def evaluate(
        run_or_model: str = typer.Argument(..., help=TARGET_HELP, show_default=False),
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        tasks: Optional[str] = typer.Option(None, "--tasks", metavar="NAME,...",
                                            help="lm-evaluation-harness tasks to run on the model (comma-separated)."),
        include_path: Optional[str] = typer.Option(None, "--include-path", metavar="DIR",
                                                   help="Directory of lm-eval task YAMLs (tasks on local files)."),
        base: Optional[str] = typer.Option(None, "--base", metavar="DIR", help="Base model of an adapter directory (default: the "
                                                                 "base_model_name_or_path it records)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (metrics and settings) on stdout."),
    ) -> None:
        """Evaluate a model: loss, perplexity, exact match, lm-eval tasks; a classifier: accuracy, F1."""
        from automodel_cli.training.model_evaluation import evaluation_config, evaluate_model, resolve_target

        task_names = _task_names(tasks)
        if include_path is not None and not task_names:
            raise UserError("--include-path names task YAMLs for --tasks, but no --tasks were given.",
                            "Add --tasks NAME,... with the tasks to run.")
        bad = [item for item in overrides or [] if "=" not in item]
        if bad:
            raise UserError(f"Unexpected argument `{bad[0]}` after RUN_OR_MODEL `{run_or_model}`.",
                            "Settings are written key=value (evaluate.max_new_tokens=32, data.path=FILE).")
        resolved = resolve_target(run_or_model, base)
        cfg = evaluation_config(registries, resolved, list(overrides or []))
        # --json: stdout is the JSON object alone; progress and library output go to stderr
        output = sys.stderr if as_json else sys.stdout
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            report = evaluate_model(cfg, resolved, registries, lambda line: print(line, file=output, flush=True),
                                    tasks=task_names, include_path=include_path)
        if as_json:
            typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            typer.echo("\n".join(report_lines(report.as_dict())))

    return evaluate


def _task_names(tasks: Optional[str]) -> list[str]:
    names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if tasks is not None and not names:
        raise UserError("--tasks is empty.", "Pass lm-eval task names: --tasks NAME,NAME.")
    return names


METRIC_LABELS = (
    ("loss", "loss (trained tokens)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("token_accuracy", "token accuracy", "{:.1%}"),
    ("teacher_forced_exact_match", "exact match (teacher-forced)", "{:.1%}"),
    ("generate_exact_match", "exact match (generated)", "{:.1%}"),
    ("generate_contains", "contains (generated)", "{:.1%}"),
    ("accuracy", "accuracy", "{:.1%}"),  # a sequence classifier's (pairwise for a reward model)
    ("f1", "macro F1", "{:.4f}"),
    ("margin", "mean reward margin", "{:.4f}"),
)
#: What a sequence classifier's loss is, by task.
CLASSIFIER_LOSS = {"classes": "loss (cross-entropy)", "reward": "loss (Bradley-Terry)"}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as a short table, the lm-eval tasks' metrics and a few example generations."""
    metrics, settings = report["metrics"], report["settings"]
    lines = []
    if metrics:
        unit = "pairs" if metrics.get("task") == "reward" else "samples"
        counted = f"{metrics['samples']} {unit}" + (f", {metrics['generate_samples']} generated (up to "
                                                    f"{settings['max_new_tokens']} new tokens)"
                                                    if "generate_samples" in metrics else "")
        lines += ["", f"{settings['data']}: {counted}"]
        labels = {"loss": CLASSIFIER_LOSS[metrics["task"]]} if "task" in metrics else {}
        lines += [f"  {labels.get(key, label):<30} {fmt.format(metrics[key])}"
                  for key, label, fmt in METRIC_LABELS if key in metrics]
    for task, values in report["tasks"].items():
        lines += ["", f"lm-eval {task}:"]
        lines += [f"  {name:<30} {value:.4f}" if isinstance(value, float) else f"  {name:<30} {value}"
                  for name, value in values.items() if "stderr" not in name]
    for index, example in enumerate(report["examples"], 1):
        lines += ["", f"example {index}:", f"  prompt:    {example['prompt']!r}",
                  f"  reference: {example['reference']!r}", f"  generated: {example['answer']!r}"]
    lines += [f"note: {note}" for note in report["notes"]]
    return lines
