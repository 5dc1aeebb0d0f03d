"""Built-in metric loggers: jsonl, wandb and tensorboard.

Targets are dotted paths, so listing loggers imports neither torch nor the optional backends;
``requires`` names the optional package each backend needs, for install hints. Every target has
the signature ``factory(*, output_dir, options, run_config) -> MetricLogger``; ``options`` are the
logger's declared options below, read from ``logging.NAME`` with their defaults.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.config.schema import option

_FACTORIES = "automodel_cli.components.logging.factories"
_TEXT = (str, type(None))


def _no_credentials(value: object) -> str | None:
    return "must not hold a key: export WANDB_API_KEY or run `wandb login` (a config is saved and printed)"


TENSORBOARD = {
    "log_dir": option(str, "tensorboard", "Event-file directory (relative: under output_dir)."),
    "flush_secs": option(int, 120, "Seconds between flushes of the event file.", ge=1),
    "max_queue": option(int, 10, "Events buffered before a flush.", ge=1),
    "filename_suffix": option(str, "", "Suffix of the event file name."),
}
WANDB = {
    "project": option(_TEXT, None, "W&B project (default: wandb's, or WANDB_PROJECT)."),
    "entity": option(_TEXT, None, "W&B team or user (default: yours, or WANDB_ENTITY)."),
    "name": option(_TEXT, None, "Run name shown in W&B."),
    "group": option(_TEXT, None, "Group runs together (e.g. one sweep)."),
    "job_type": option(_TEXT, None, "Kind of run, for filtering (train, eval, ...)."),
    "tags": option(list, [], "Tags of the run."),
    "notes": option(_TEXT, None, "A longer description of the run."),
    "mode": option(_TEXT, None, "online, offline or disabled; null: online when logged in, else offline under "
                   "output_dir (upload later with `wandb sync`).", choices=(None, "online", "offline", "disabled")),
    "dir": option(_TEXT, None, "Where wandb writes its files (default: output_dir)."),
    "id": option(_TEXT, None, "Run id, to continue a W&B run (with resume)."),
    "resume": option((str, bool, type(None)), None, "wandb.init's resume: allow, must, never, auto, or true."),
    "save_code": option(bool, False, "Save the main script's code with the run."),
    "settings": option(dict, {}, "wandb.Settings fields, passed as they are.", open=True),
    "api_key": option(_TEXT, None, "Never set: credentials come from WANDB_API_KEY or `wandb login`.",
                      check=_no_credentials, check_doc="null only"),
}


@hookimpl
def register_loggers(registry):
    registry.add("jsonl", f"{_FACTORIES}:jsonl",
                 description="One JSON object per optimizer step in OUTPUT_DIR/metrics.jsonl (always on).")
    registry.add("wandb", f"{_FACTORIES}:wandb", requires=["wandb"], options=WANDB,
                 description="Weights & Biases; offline under OUTPUT_DIR unless logged in or WANDB_MODE is set.")
    registry.add("tensorboard", f"{_FACTORIES}:tensorboard", requires=["tensorboard"], options=TENSORBOARD,
                 description="TensorBoard scalars in OUTPUT_DIR/tensorboard.")
