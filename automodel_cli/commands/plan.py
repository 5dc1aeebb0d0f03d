"""``automodel plan``: the memory plan of a run, without running it.

The same table ``--dry-run`` prints and a run prints first (``training/memory_plan.py``), for a
config resolved exactly as the recipe command would resolve it (TARGET, ``-c`` files, the run
options, ``key=value`` overrides). With ``distributed.auto=true`` the automatic layout is chosen
first, as a launch would choose it (its candidates, the choice and why), and the plan is that
layout's. ``--json`` prints it as one JSON object. No torch.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from automodel_cli.commands.run import (ARGUMENTS, CONFIG_OPTION, GPUS_OPTION, LAUNCHER_OPTION, NODES_OPTION,
                                        NPROC_OPTION, PEFT_OPTION, launch_flags)
from automodel_cli.errors import UserError
from automodel_cli.registry import Registries


def plan_command(registries: Registries):
    default_recipe = "finetune" if "finetune" in registries.recipes else None

    def plan(
        arguments: Optional[list[str]] = ARGUMENTS,
        config: list[str] = CONFIG_OPTION,
        peft: Optional[str] = PEFT_OPTION,
        nproc_per_node: Optional[int] = NPROC_OPTION,
        gpus_per_node: Optional[int] = GPUS_OPTION,
        nodes: Optional[int] = NODES_OPTION,
        launcher: Optional[str] = LAUNCHER_OPTION,
        recipe: Optional[str] = typer.Option(default_recipe, "--recipe", help="Recipe whose run is planned."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Memory per process of a run: parameters, gradients, optimizer state, activations, logits, peak; whether it fits and what helps most."""
        from automodel_cli.components.launch.start import make_launcher, processes_per_node, resolve_mesh
        from automodel_cli.config.assemble import resolve_command, split_arguments
        from automodel_cli.training.memory_plan import launch_target, plan_report

        if recipe is None or recipe not in registries.recipes:
            raise UserError(f"--recipe {recipe} is not a registered recipe.",
                            f"Use one of: {', '.join(registries.recipes.names())} (`automodel list recipes`).")
        entry = registries.recipes.get(recipe)
        target, overrides = split_arguments(arguments or [])
        cfg = resolve_command(registries, recipe=entry, target=target, config_files=config, overrides=overrides,
                              flags=launch_flags(peft, nproc_per_node, gpus_per_node, nodes, launcher, None))
        processes = processes_per_node(cfg)
        local = not make_launcher(registries, cfg.launch.launcher).requests_gpus
        shape, layout = resolve_mesh(entry.name, cfg, processes=processes, local=local, registries=registries)
        report = plan_report(cfg, entry.name, shape, launch_target(cfg, local=local, processes_per_node=processes),
                             registries)
        if as_json:
            typer.echo(json.dumps({**report.as_dict(), **({"auto_layout": layout.as_dict()} if layout else {})},
                                  indent=2))
        else:
            typer.echo("\n".join((layout.lines() + [""] if layout else []) + report.lines()))

    return plan
