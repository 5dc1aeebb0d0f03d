"""The run's output directory: where it is, whether it may be used, and the saved config.

A run directory belongs to one run. Starting a new run in a directory that already holds one
is refused (nothing there is touched); resuming (``checkpoint.resume=auto`` or a path) is
allowed only when the settings that decide what is trained match the saved ones.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir
from automodel_cli.components.training import run_lock
from automodel_cli.config.yaml_io import load_yaml_file, write_text_atomic
from automodel_cli.errors import UserError

CONFIG_FILE = RunDir.CONFIG


#: Settings a resumed run must share with the run it continues.
IDENTITY_KEYS = (
    "model.path", "model.from_scratch", "model.config", "model.dtype",
    "data.name", "data.path", "data.max_length", "data.packing", "data.prompt_column",
    "data.completion_column", "data.messages_column", "data.shuffle", "data.text_column", "data.streaming",
    "peft.method", "peft.rank", "peft.alpha", "peft.target_modules",
    "train.global_batch_size", "train.seed", "loss.name", "optim.name",
)


#: Optimizer and schedule settings: every ``optim.*`` key (the optimizer's and the schedule's own
#: options too) and these. A checkpoint restores its optimizer and schedule, so a new value here
#: would be silently ignored: changing one on resume must be asked for.
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "train.max_grad_norm")
SCHEDULE_SECTION = "optim."
#: The run's length: it shapes the schedule unless the rate is constant (with warmup in steps).
LENGTH_KEYS = ("train.max_steps", "train.epochs")
#: Not compared on resume: where the run is, how it was asked to resume, how it is launched.
NOT_COMPARED = ("output_dir", "recipe", "checkpoint.resume", "checkpoint.allow_changes")
NOT_COMPARED_SECTIONS = ("launch.",)


def default_output_dir(recipe: str, target: str | None) -> Path:
    """``runs/<recipe>-<model>-<timestamp>``: a fresh directory for every run by default."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(target or "model").name).strip("-") or "model"
    return Path("runs") / f"{recipe}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_requested(cfg: Any) -> bool:
    return cfg.checkpoint.resume not in (None, False, "off", "none", "")


def prepare_output_dir(cfg: Any, recipe: str) -> Path:
    """Pick and vet the output directory; the saved config is written by ``save_config``."""
    if cfg.output_dir is None:
        if cfg.checkpoint.resume == "auto":
            raise UserError(
                "checkpoint.resume=auto needs the output_dir of the run to continue.",
                "Pass --output-dir DIR (the directory of the interrupted run).",
            )
        return default_output_dir(recipe, cfg.model.path)
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir `{output_dir}` exists and is not a directory.",
                        "Choose another --output-dir.")
    if (record := run_lock.holder(output_dir)) is not None:  # a live run: say so, whatever is asked
        raise run_lock.in_use(output_dir, record)
    holds_run = RunDir(output_dir).holds_run()
    if not holds_run:
        return output_dir
    if not resume_requested(cfg):
        raise UserError(
            f"output_dir `{output_dir}` already holds a run; it was left untouched.",
            "Continue it with checkpoint.resume=auto, or choose another --output-dir.",
        )
    saved_path = output_dir / CONFIG_FILE
    if saved_path.exists():
        saved, _ = load_yaml_file(saved_path)
        differences = [
            f"{key}: saved {_get(saved, key)!r}, now {cfg.get(key)!r}"
            for key in IDENTITY_KEYS
            if _normalise(_get(saved, key)) != _normalise(cfg.get(key))
        ]
        if differences:
            raise UserError(
                f"output_dir `{output_dir}` holds a different run, so it cannot be resumed with "
                f"these settings ({'; '.join(differences)}).",
                "Resume with the original settings, or start a new run in another --output-dir.",
            )
        if cfg.checkpoint.resume == "auto" and (step := _latest_step(output_dir)) is not None:
            check_resume_changes(cfg, changes_since(cfg, saved, step))
    return output_dir


def _latest_step(output_dir: Path) -> int | None:
    """The step of the newest finished checkpoint in ``output_dir``, or None."""
    from automodel_cli.components.checkpoint import layout

    finished = layout.list_checkpoints(layout.checkpoints_root(output_dir))
    return finished[-1][0] if finished else None


# -------------------------------------------------------------------- resuming with changes
@dataclass
class ResumeChanges:
    """What a resumed run changes against the config its checkpoint was trained with:
    ``schedule`` changes alter the optimizer or the learning-rate schedule (explicit only),
    ``other`` ones change how the run is carried out (logging, cadence, layout) and are logged.
    Each maps a dotted key to (saved value, new value)."""

    schedule: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    other: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.schedule or self.other)

    def lines(self) -> list[str]:
        return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in {**self.schedule, **self.other}.items()]


def changes_since(cfg: Any, saved: dict[str, Any], step: int) -> ResumeChanges:
    """Compare the resolved config with the ``saved`` one (secrets compared redacted, as saved)
    for a resume at ``step``."""
    now = _leaves(cfg.redacted())
    then = {key: _get(saved, key, getattr(cfg, "schema", None)) for key in now}
    changes = ResumeChanges()
    for key, value in now.items():
        old = then[key]
        if _normalise(old) == _normalise(value) or key in NOT_COMPARED or key.startswith(NOT_COMPARED_SECTIONS) \
                or any(key == k or key.startswith(k + ".") for k in IDENTITY_KEYS):
            continue
        (changes.schedule if key in SCHEDULE_KEYS or key.startswith(SCHEDULE_SECTION) else changes.other)[key] = \
            (old, value)
    if not _length_changed_past_rates(cfg, saved, step):  # the new length would have run the same steps
        for key in LENGTH_KEYS:
            if key in changes.schedule:
                changes.other[key] = changes.schedule.pop(key)
    return changes


def changes_since_checkpoint(cfg: Any, checkpoint: Path) -> ResumeChanges:
    """Changes against the config of the run that wrote ``checkpoint`` (RUN/checkpoints/step_N);
    none when that run left no config."""
    saved_path = Path(checkpoint).parent.parent / CONFIG_FILE
    if not saved_path.is_file():
        return ResumeChanges()
    saved, _ = load_yaml_file(saved_path)
    from automodel_cli.components.checkpoint import layout

    return changes_since(cfg, saved, layout.parse_step(Path(checkpoint).name) or 0)


def check_resume_changes(cfg: Any, changes: ResumeChanges) -> None:
    """Refuse optimizer or schedule changes on resume unless ``checkpoint.allow_changes`` asks
    for them: the checkpoint carries the old schedule, which would otherwise silently win."""
    if changes.schedule and not cfg.checkpoint.allow_changes:
        listed = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changes.schedule.items())
        raise UserError(
            f"This resume changes optimizer or schedule settings the checkpoint was trained with ({listed}); "
            f"the checkpoint's optimizer and learning-rate schedule would otherwise continue unchanged.",
            "Resume with the saved values, or add checkpoint.allow_changes=true to apply the new values from the "
            "resumed step on (the schedule is recomputed for the new settings, as if they had been used from "
            "the start; the change is logged and recorded in config_history.jsonl), or start a new run in "
            "another --output-dir.",
        )


def record_resume_changes(output_dir: Path, step: int, changes: ResumeChanges) -> None:
    """Append what a resume changed to ``config_history.jsonl``: config.yaml holds the settings in
    force now, the history which steps ran with which values."""
    import json

    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": {key: {"before": old, "after": new}
                         for key, (old, new) in {**changes.schedule, **changes.other}.items()}}
    with open(RunDir(output_dir).history, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")


def _length_changed_past_rates(cfg: Any, saved: dict[str, Any], step: int) -> bool:
    """Whether a new run length would have given any of the first ``step`` steps another
    learning rate. When it would not (a constant rate, or steps still in a warmup given in
    steps), the resumed run is exactly the run the new length plans from the start, so the
    change needs no asking; otherwise (a decay already under way) it does."""
    from automodel_cli.components.optim.build import schedule_multiplier

    old_total, new_total = _get(saved, "train.max_steps"), cfg.get("train.max_steps")
    if not isinstance(old_total, int) or not isinstance(new_total, int):
        return True  # a length in epochs depends on the data: not worth guessing
    from types import SimpleNamespace

    def rates(optim: Any, total: int) -> list[float]:
        multiplier = schedule_multiplier(optim, total)
        return [multiplier(s) for s in range(step)]

    keys = ("warmup_steps", "scheduler", "min_lr_ratio")
    then = SimpleNamespace(**{key: _get(saved, f"optim.{key}") for key in keys})
    setattr(then, then.scheduler, _get(saved, f"optim.{then.scheduler}"))  # the schedule's own options
    try:
        return rates(then, old_total) != rates(cfg.optim, new_total)
    except UserError:  # the saved schedule is no longer registered: it cannot be compared
        return True


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict) and value:
            out.update(_leaves(value, dotted))
        else:
            out[dotted] = value
    return out


def _get(tree: dict, dotted: str, schema: Any = None) -> Any:
    """A saved setting; one the saved config lacks (written before the key existed) had the
    schema default."""
    from automodel_cli.config.schema import CORE_SCHEMA

    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            key = (schema or CORE_SCHEMA).lookup(dotted)
            return key.default if key is not None else None
        node = node[part]
    return node


def _normalise(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def save_config(cfg: Any, output_dir: Path) -> None:
    """Write the resolved config (secrets redacted) beside the run's outputs."""
    write_text_atomic(output_dir / CONFIG_FILE, cfg.to_yaml(with_sources=False))
