"""The run's output directory: where it is, whether it may be used, and the saved config.

A run directory belongs to one run. Starting a new run in a directory that already holds one
is refused (nothing there is touched); resuming (``checkpoint.resume=auto`` or a path) is
allowed only when the settings that decide what is trained match the saved ones.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from automodel_cli.config.yaml_io import load_yaml_file, write_text_atomic
from automodel_cli.errors import UserError

CONFIG_FILE = "config.yaml"
RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", "checkpoints", "final")

#: Settings a resumed run must share with the run it continues (max_steps may grow).
IDENTITY_KEYS = (
    "model.path", "model.from_scratch", "model.config", "model.dtype",
    "data.name", "data.path", "data.max_length", "data.packing", "data.prompt_column",
    "data.completion_column", "data.messages_column", "data.shuffle", "data.text_column", "data.streaming",
    "peft.method", "peft.rank", "peft.alpha", "peft.target_modules",
    "train.global_batch_size", "train.seed", "loss.name",
)


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
    holds_run = output_dir.is_dir() and any((output_dir / m).exists() for m in RUN_MARKERS)
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
    return output_dir


def _get(tree: dict, dotted: str) -> Any:
    """A saved setting; one the saved config lacks (written before the key existed) had the
    schema default."""
    from automodel_cli.config.schema import lookup

    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            key = lookup(dotted)
            return key.default if key is not None else None
        node = node[part]
    return node


def _normalise(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def save_config(cfg: Any, output_dir: Path) -> None:
    """Write the resolved config (secrets redacted) beside the run's outputs."""
    write_text_atomic(output_dir / CONFIG_FILE, cfg.to_yaml(with_sources=False))
