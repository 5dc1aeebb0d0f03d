"""Every hook a plugin can implement.

Each ``register_*`` hook receives a typed registry and adds entries to it; hooks return nothing.
Entries are factories or ``"module:attr"`` dotted paths resolved when first used, so listing
plugins never imports torch. docs/plugins.md documents each hook (a meta-test keeps the two in
step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from automodel_cli import PROJECT_NAME

if TYPE_CHECKING:  # pragma: no cover - typing only
    from automodel_cli.registry import (
        DatasetRegistry,
        LauncherRegistry,
        LoggerRegistry,
        LossRegistry,
        MoeBlockRegistry,
        ModelRegistry,
        OptimizerRegistry,
        ParallelPlanRegistry,
        RecipeRegistry,
        ScheduleRegistry,
    )

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def register_recipes(registry: RecipeRegistry) -> None:
    """Add recipes; each becomes a top-level command (``automodel NAME ...``).

    ``registry.add(name, target, description=..., defaults=..., sections=...)`` where ``target``
    is ``"module:function"``: ``run(context) -> int``, called with an
    ``automodel_cli.context.RecipeContext`` (the resolved config, the registries, the recipe's
    name) and returning the exit code.
    """


@hookspec
def register_models(registry: ModelRegistry) -> None:
    """Add model presets: a short name for a HF hub id or local path plus default settings.

    ``registry.add(name, path=..., family=..., defaults={...}, description=...)``.
    """


@hookspec
def register_datasets(registry: DatasetRegistry) -> None:
    """Add datasets usable as ``data.name``: ``registry.add(name, target, options=...)`` where
    ``target(path, split, options)`` returns a ``datasets.Dataset``."""


@hookspec
def register_losses(registry: LossRegistry) -> None:
    """Add losses usable as ``loss.name``: ``registry.add(name, target, description=...)`` where
    ``target`` is an ``automodel_cli.components.loss.spec.LossSpec`` (how to call the loss, its
    options at ``loss.NAME``) or a plain logits loss function."""


@hookspec
def register_parallel_plans(registry: ParallelPlanRegistry) -> None:
    """Add tensor-parallel plans keyed by Hugging Face ``model_type``: ``registry.add(model_type,
    target)`` where ``target(model, tp_mesh, sequence_parallel)`` returns ``{module name:
    torch ParallelStyle}``."""


@hookspec
def register_launchers(registry: LauncherRegistry) -> None:
    """Add launchers usable as ``--launcher NAME`` (local, slurm, k8s, ...): ``registry.add(name,
    target)`` where ``target`` is a subclass of ``automodel_cli.components.launch.base.Launcher``
    (options at ``launch.NAME``)."""


@hookspec
def register_loggers(registry: LoggerRegistry) -> None:
    """Add metric loggers usable in ``logging.loggers`` (jsonl, wandb, tensorboard, ...):
    ``registry.add(name, target, options=...)`` where ``target(*, output_dir, options,
    run_config)`` returns an object with ``log(metrics, step)`` and ``close()``."""


@hookspec
def register_moe_blocks(registry: MoeBlockRegistry) -> None:
    """Add kinds of mixture-of-experts experts modules: ``registry.add(name, target,
    description=...)`` where ``target`` is an ``automodel_cli.components.moe.experts.ExpertKind``
    or ``"module:attr"`` naming one (which modules it matches, which parameters hold one slice per
    expert, how to compute tokens grouped by expert)."""


@hookspec
def register_optimizers(registry: OptimizerRegistry) -> None:
    """Add optimizers usable as ``optim.name``: ``registry.add(name, target, options=...)`` where
    ``target(settings)`` returns a ``torch.optim.Optimizer`` built from an
    ``automodel_cli.components.optim.build.OptimizerSettings`` (the model, the peak rate,
    ``optim.weight_decay``/``betas``/``eps`` and the entry's options at ``optim.NAME``)."""


@hookspec
def register_schedulers(registry: ScheduleRegistry) -> None:
    """Add learning-rate schedules usable as ``optim.scheduler``: ``registry.add(name, target,
    options=...)`` where ``target(step, *, warmup, total, min_ratio, options)`` returns the
    multiplier of the peak rate at 0-based ``step`` (options at ``optim.NAME``)."""
