"""Built-in recipes; each becomes a top-level command."""

from __future__ import annotations

from automodel_cli import hookimpl


@hookimpl
def register_recipes(registry):
    registry.add(
        "finetune",
        "automodel_cli.recipes.finetune:run",
        description="Supervised fine-tuning of a causal LM: full, LoRA or DoRA.",
    )
