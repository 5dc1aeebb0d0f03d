"""Built-in metric loggers: jsonl, wandb and tensorboard.

Targets are dotted paths, so listing loggers imports neither torch nor the optional backends;
``requires`` names the optional package each backend needs, for install hints. Every target has
the signature ``factory(*, output_dir, options, run_config) -> MetricLogger``.
"""

from __future__ import annotations

from automodel_cli import hookimpl

_FACTORIES = "automodel_cli.components.logging.factories"


@hookimpl
def register_loggers(registry):
    registry.add("jsonl", f"{_FACTORIES}:jsonl",
                 description="One JSON object per optimizer step in OUTPUT_DIR/metrics.jsonl (always on).")
    registry.add("wandb", f"{_FACTORIES}:wandb", requires=["wandb"],
                 description="Weights & Biases; offline under OUTPUT_DIR unless logged in or WANDB_MODE is set.")
    registry.add("tensorboard", f"{_FACTORIES}:tensorboard", requires=["tensorboard"],
                 description="TensorBoard scalars in OUTPUT_DIR/tensorboard.")
