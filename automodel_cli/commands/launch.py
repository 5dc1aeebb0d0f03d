"""``automodel launch``: start a YAML config anywhere, then follow, inspect or cancel its job.

``automodel launch FILE.yaml`` runs the recipe the file names (``recipe: finetune``) with the
launcher its ``launch:`` section names, so one file runs locally, on Slurm or on Kubernetes by
changing only that section. ``status``, ``logs`` and ``cancel`` find a job by its job
directory or id and ask the launcher that started it.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from typer.core import TyperGroup

from automodel_cli.commands.run import (CONFIG_OPTION, DRY_RUN_OPTION, GPUS_OPTION, LAUNCHER_OPTION, NODES_OPTION,
                                        NPROC_OPTION, OUTPUT_OPTION, launch_flags, resolve_and_start)
from automodel_cli.errors import UserError, did_you_mean
from automodel_cli.registry import Registries

RUN_COMMAND = "run"


class LaunchGroup(TyperGroup):
    """``automodel launch FILE ...`` without a subcommand name means ``launch run FILE ...``."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands:
            args = [RUN_COMMAND, *args]
        return super().resolve_command(ctx, args)

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "FILE.yaml [OPTIONS] [key=value]... | status|logs|cancel|list ...")


def launch_app(registries: Registries) -> typer.Typer:
    app = typer.Typer(
        cls=LaunchGroup, no_args_is_help=True,
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
        help="Start a recipe config with the launcher its `launch:` section names; follow, inspect "
             "or cancel the jobs it started.",
    )

    @app.command(RUN_COMMAND, hidden=True, context_settings={"allow_interspersed_args": True})
    def launch_run(
        file: str = typer.Argument(..., help="Recipe config (YAML) naming `recipe:` and `launch:`."),
        overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides.", show_default=False),
        config: list[str] = CONFIG_OPTION,
        nproc_per_node: Optional[int] = NPROC_OPTION,
        gpus_per_node: Optional[int] = GPUS_OPTION,
        nodes: Optional[int] = NODES_OPTION,
        launcher: Optional[str] = LAUNCHER_OPTION,
        output_dir: Optional[str] = OUTPUT_OPTION,
        dry_run: bool = DRY_RUN_OPTION,
    ) -> None:
        """Launch FILE.yaml: the recipe it names, with the launcher of its `launch:` section."""
        from automodel_cli.config.assemble import split_arguments

        target, rest = split_arguments([file, *(overrides or [])])
        entry = registries.recipes.get(_recipe_named(target, rest, registries))
        resolve_and_start(registries, entry, target=target, config_files=config, overrides=rest,
                          flags=launch_flags(None, nproc_per_node, gpus_per_node, nodes, launcher, output_dir),
                          dry_run=dry_run)

    @app.command("status")
    def launch_status(job: str = typer.Argument(..., help="Job directory or job id ([LAUNCHER:]ID).")) -> None:
        """Show a job's state as its scheduler reports it."""
        record, launcher = _job(job, registries)
        typer.echo(f"{record.launcher} job {record.job_id} ({record.recipe}) in {record.job_dir}")
        typer.echo(launcher.status(record).rstrip("\n"))

    @app.command("logs")
    def launch_logs(
        job: str = typer.Argument(..., help="Job directory or job id ([LAUNCHER:]ID)."),
        follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends."),
    ) -> None:
        """Print a job's output."""
        record, launcher = _job(job, registries)
        code = launcher.logs(record, follow)
        if code:
            raise typer.Exit(code)

    @app.command("cancel")
    def launch_cancel(job: str = typer.Argument(..., help="Job directory or job id ([LAUNCHER:]ID).")) -> None:
        """Cancel a job (its last checkpoint stays; resume with checkpoint.resume=auto)."""
        record, launcher = _job(job, registries)
        typer.echo(launcher.cancel(record).rstrip("\n"))

    @app.command("list")
    def launch_list(limit: int = typer.Option(20, "--limit", help="How many recent jobs to show.")) -> None:
        """Jobs submitted from this machine, newest first."""
        from automodel_cli.components.launch.base import recent_jobs, state_dir

        rows = recent_jobs(limit)
        if not rows:
            typer.echo(f"No jobs recorded in {state_dir() / 'jobs'}.")
            return
        for row in rows:
            typer.echo(f"{row.get('submitted_at', ''):25} {row.get('launcher', ''):8} "
                       f"{row.get('job_id', ''):14} {row.get('job_dir', '')}")

    return app


def _recipe_named(target: str | None, overrides: list[str], registries: Registries) -> str:
    """The recipe a launch file is for: ``recipe=`` on the command line, else ``recipe:`` in it."""
    from automodel_cli.config.yaml_io import load_yaml_file

    for item in overrides:
        if item.startswith("recipe="):
            name = item.partition("=")[2]
            break
    else:
        if target is None or not target.endswith((".yaml", ".yml")):
            raise UserError(f"`automodel launch` takes a YAML config file, got `{target}`.",
                            "Pass FILE.yaml (with `recipe:` and `launch:` sections), or run a recipe "
                            "directly: `automodel finetune TARGET --launcher ...`.")
        data, lines = load_yaml_file(target)
        name = data.get("recipe")
        if not name:
            raise UserError(f"{target} does not say which recipe it is for.",
                            f"Add a top-level line such as `recipe: finetune` (available: "
                            f"{', '.join(registries.recipes.names())}), or pass recipe=NAME.")
        if name not in registries.recipes:
            raise UserError(f"{target}:{lines.get('recipe', 1)}: unknown recipe `{name}`."
                            f"{did_you_mean(str(name), registries.recipes.names())}",
                            f"Available: {', '.join(registries.recipes.names())} (`automodel list recipes`).")
    return str(name)


def _job(job: str, registries: Registries) -> tuple[Any, Any]:
    from automodel_cli.components.launch.base import find_job
    from automodel_cli.components.launch.start import make_launcher

    record = find_job(job)
    if record.launcher not in registries.launchers:
        raise UserError(f"Job {record.job_id} was started by the `{record.launcher}` launcher, which no "
                        f"installed plugin provides now.",
                        f"Reinstall the plugin that provides it (`automodel list launchers` shows "
                        f"{', '.join(registries.launchers.names())}).")
    return record, make_launcher(registries, record.launcher)
