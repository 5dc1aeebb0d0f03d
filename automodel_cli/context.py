"""What a recipe is called with.

A recipe's target is ``run(context) -> int``. The context carries the resolved config, the
registries the command was built from (so a recipe never reaches for a global plugin host) and
the recipe's name. ``automodel_cli.training.TrainingRun(context)`` turns it into a running
training job: processes, mesh, run directory, and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeContext:
    """The resolved config (``ResolvedConfig``: ``config.train.max_steps``,
    ``config.get("train.max_steps")``), the registries (``registries.losses.get(name)``, ...)
    and the recipe's name."""

    config: Any
    registries: Any
    recipe: str
