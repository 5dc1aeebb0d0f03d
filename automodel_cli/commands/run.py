"""What every command that runs a recipe shares: its options, its flag layer and how it starts.

The recipe commands (``automodel finetune ...``, one per registered recipe) and ``automodel
launch FILE`` take the same run options and resolve and start a config the same way; both are
built from this module, which ``cli.py`` mounts. Like the rest of the CLI it imports torch, the
config parser and the launchers only inside the command bodies, so ``--help`` stays fast.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import typer

from automodel_cli.errors import UserError
from automodel_cli.registry import Entry, Registries

ARGS_HELP = "TARGET (a model preset or a YAML file), then key=value overrides."
CONFIG_HELP = "YAML config file; repeat to layer several (later wins)."
PEFT_HELP = "none, lora, dora or qlora (peft.method; qlora: peft.quantization=nf4|int8)."
NPROC_HELP = "Processes per node; > 1 starts torchrun (launch.nproc_per_node)."
GPUS_HELP = "GPUs per node: requests them from the cluster and runs one process per GPU (launch.gpus_per_node)."
NODES_HELP = "Nodes for the job; > 1 needs --launcher slurm or k8s (launch.nodes)."
LAUNCHER_HELP = "Where to run: local (default), slurm, k8s or a plugin's (launch.launcher)."
DRY_RUN_HELP = "Print the resolved config, the memory plan and the batch script or manifest; run nothing."


#: Options shared by the recipe commands and `automodel launch FILE` (OptionInfo objects are
#: plain declarations, so one instance can serve several commands).
ARGUMENTS = typer.Argument(None, help=ARGS_HELP, show_default=False)
CONFIG_OPTION = typer.Option([], "-c", "--config", help=CONFIG_HELP)
PEFT_OPTION = typer.Option(None, "--peft", help=PEFT_HELP)
NPROC_OPTION = typer.Option(None, "--nproc-per-node", help=NPROC_HELP)
GPUS_OPTION = typer.Option(None, "--gpus-per-node", help=GPUS_HELP)
NODES_OPTION = typer.Option(None, "--nodes", help=NODES_HELP)
LAUNCHER_OPTION = typer.Option(None, "--launcher", help=LAUNCHER_HELP)
OUTPUT_OPTION = typer.Option(None, "--output-dir", "-o", help="Output directory (output_dir).")
DRY_RUN_OPTION = typer.Option(False, "--dry-run", help=DRY_RUN_HELP)


def launch_flags(peft: Optional[str], nproc_per_node: Optional[int], gpus_per_node: Optional[int],
                 nodes: Optional[int], launcher: Optional[str],
                 output_dir: Optional[str]) -> dict[str, tuple[str, Any]]:
    """The flag layer of a launchable command: dotted key -> (flag text, value)."""
    if gpus_per_node is not None and nproc_per_node is not None and nproc_per_node != gpus_per_node:
        raise UserError(f"--gpus-per-node {gpus_per_node} and --nproc-per-node {nproc_per_node} disagree.",
                        "Give one of them: --gpus-per-node runs one process per GPU.")
    return {
        "peft.method": ("--peft", peft),
        "launch.gpus_per_node": ("--gpus-per-node", gpus_per_node),
        "launch.nproc_per_node": ("--gpus-per-node" if gpus_per_node is not None else "--nproc-per-node",
                                  gpus_per_node if gpus_per_node is not None else nproc_per_node),
        "launch.nodes": ("--nodes", nodes),
        "launch.launcher": ("--launcher", launcher),
        "output_dir": ("--output-dir", output_dir),
    }


def resolve_and_start(registries: Registries, entry: Entry, *, target: Optional[str], config_files: list[str],
                      flags: dict[str, tuple[str, Any]], overrides: list[str], dry_run: bool) -> None:
    """Resolve a recipe's config and run, print (--dry-run) or submit it through its launcher."""
    from automodel_cli.components.launch.start import start
    from automodel_cli.config.assemble import resolve_command
    from automodel_cli.training.memory_plan import launch_plan_text

    resolved = resolve_command(registries, recipe=entry, target=target, config_files=config_files,
                               flags=flags, overrides=overrides)
    named = resolved.get("recipe")
    if named and named != entry.name:  # a config written for another recipe is not silently reused
        raise UserError(f"{resolved.source_of('recipe')}: this config is for the `{named}` recipe, not "
                        f"`{entry.name}`.",
                        f"Run `automodel {named} ...` or `automodel launch FILE`, or change `recipe:`.")
    code = start(entry, resolved, registries, dry_run=dry_run, echo=lambda text: typer.echo(text, nl=False),
                 memory_plan=lambda spec, launcher: launch_plan_text(spec, launcher, registries))
    if code:
        raise typer.Exit(code)


def recipe_command(entry: Entry, registries: Registries):
    """A top-level command that resolves the config and hands it to the recipe's launcher."""

    def command(
        arguments: Optional[list[str]] = ARGUMENTS,
        config: list[str] = CONFIG_OPTION,
        peft: Optional[str] = PEFT_OPTION,
        nproc_per_node: Optional[int] = NPROC_OPTION,
        gpus_per_node: Optional[int] = GPUS_OPTION,
        nodes: Optional[int] = NODES_OPTION,
        launcher: Optional[str] = LAUNCHER_OPTION,
        output_dir: Optional[str] = OUTPUT_OPTION,
        dry_run: bool = DRY_RUN_OPTION,
        as_json: bool = False,
    ) -> None:
        from automodel_cli.config.assemble import split_arguments

        target, overrides = split_arguments(arguments or [])
        flags = launch_flags(peft, nproc_per_node, gpus_per_node, nodes, launcher, output_dir)
        if json_key:
            flags[json_key] = ("--json", True if as_json else None)
        resolve_and_start(registries, entry, target=target, config_files=config, overrides=overrides,
                          flags=flags, dry_run=dry_run)

    command.__doc__ = entry.description or f"Run the {entry.name} recipe."
    # `--json` exists only for recipes that declare a JSON output key (typer reads the signature).
    json_key = entry.metadata.get("json_output")
    signature = inspect.signature(command)
    parameters = [p for p in signature.parameters.values() if p.name != "as_json"]
    if json_key:
        parameters.append(signature.parameters["as_json"].replace(
            default=typer.Option(False, "--json", help=f"Print one JSON object for scripts ({json_key}).")))
    command.__signature__ = signature.replace(parameters=parameters)
    return command
