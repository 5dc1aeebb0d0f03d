"""The ``automodel`` command line.

Built-in commands (plugins, list, config) are defined here; every recipe registered through the
``register_recipes`` hook becomes a top-level command with the same common options (built by
``commands/run.py``, which ``automodel launch`` shares). Building the app loads plugin entry
points but never torch, so ``automodel --help`` stays fast.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any, Optional

import typer

from automodel_cli import __version__
from automodel_cli.commands.checkpoint import checkpoint_app
from automodel_cli.commands.convert import convert_app
from automodel_cli.commands.data import data_app
from automodel_cli.commands.evaluate import evaluate_command
from automodel_cli.commands.launch import launch_app
from automodel_cli.commands.plan import plan_command
from automodel_cli.commands.run import ARGS_HELP, CONFIG_HELP, recipe_command
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import PluginHost, PluginRecord, host_for_command, warnings_shown_once
from automodel_cli.plugin_settings import split_global_options
from automodel_cli.registry import Registries

HELP = (
    "Fine-tune, pre-train and distil Hugging Face models from one command, "
    "from one CPU to many GPU nodes. Plugins add models, datasets, losses, parallel plans, "
    "launchers and loggers."
)


def _print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(key)) for key, _ in columns])
    Console(width=max(100, Console().width)).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _echo_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


# --------------------------------------------------------------------------- plugins
def _plugins_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)

    @app.command("list")
    def plugins_list(
        all_: bool = typer.Option(False, "--all", help="Include the built-in plugins."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """List loaded plugins: distribution, version, hooks and load status."""
        records = [r for r in host.records if all_ or not r.builtin]
        if as_json:
            _echo_json([r.as_dict() for r in records])
            return
        if not records:
            typer.echo("No third-party plugins installed (use --all to include built-ins).")
            return
        rows = [{**r.as_dict(), "status": _status_text(r)} for r in records]
        _print_table(rows, [("name", "Plugin"), ("distribution", "Distribution"),
                            ("version", "Version"), ("hooks", "Hooks"), ("status", "Status")],
                     title="Plugins")

    @app.command("doctor")
    def plugins_doctor() -> None:
        """Report broken plugins, name collisions and hooks that match no hookspec."""
        loaded = sum(r.status == "loaded" for r in host.records)
        typer.echo(f"{len(host.records)} plugins found, {loaded} loaded.")
        for record in host.records:
            if record.status in ("blocked", "not-loaded"):
                typer.echo(f"  {record.name} ({record.distribution or '-'}): {_status_text(record)}")
        if not host.problems:
            typer.echo("No problems found.")
            return
        typer.echo(f"{len(host.problems)} problem(s):")
        for problem in host.problems:
            typer.echo(f"  - {problem}")
        raise typer.Exit(1)

    return app


def _status_text(record: PluginRecord) -> str:
    if record.blocked_by:
        return f"{record.status} by {record.blocked_by}"
    return f"{record.status}: {record.errors[-1]}" if record.errors else record.status


# ------------------------------------------------------------------------------ list
LISTING_HELP = {
    "recipes": "Recipes (top-level commands).",
    "models": "Model presets usable as TARGET.",
    "datasets": "Datasets usable as data.name.",
    "losses": "Losses usable as loss.name.",
    "parallel-plans": "Tensor-parallel plans by HF model_type.",
    "launchers": "Launchers that start jobs (local, Slurm, Kubernetes).",
    "loggers": "Metric loggers usable in logging.loggers.",
    "moe-blocks": "Kinds of mixture-of-experts experts modules automodel computes (grouped GEMM, expert parallelism).",
    "optimizers": "Optimizers usable as optim.name.",
    "schedulers": "Learning-rate schedules usable as optim.scheduler.",
}


def _list_app(registries: Registries) -> typer.Typer:
    app = typer.Typer(help="List what the registries hold and which plugin provided each entry.",
                      no_args_is_help=True)
    for listing, help_text in LISTING_HELP.items():
        app.command(listing, help=help_text)(_make_listing(registries, listing))
    return app


def _make_listing(registries: Registries, listing: str):
    def command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        registry = registries.by_listing[listing]
        rows = [entry.as_dict() for entry in registry]
        for row in rows:  # registrations of the same name that are ignored or in conflict
            row["collisions"] = [c.as_dict() for c in registry.conflicts if c.name == row["name"]]
        if as_json:
            _echo_json(rows)
            return
        rows = [shown for row in rows for shown in [row, *_collision_rows(row)]]
        for row in rows:
            row["provider"] = f"{row['distribution']} {row['version'] or ''}".strip() \
                if row["distribution"] else row["plugin"]
        columns = [("name", "Name"), ("description", "Description")]
        if listing == "models":
            columns += [("path", "Path"), ("family", "Family")]
        columns += [("provider", "From"), ("overrides", "Overrides")]
        if any(row.get("effect") for row in rows):
            columns.append(("effect", "Note"))
        if not rows:
            typer.echo(f"No {listing} registered.")
            return
        _print_table(rows, columns, title=listing.capitalize())

    return command


def _collision_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A table row under an entry for each other plugin that registered its name."""
    return [{"name": row["name"], **collision} for collision in row["collisions"]]


# ---------------------------------------------------------------------------- config
def _config_app(registries: Registries) -> typer.Typer:
    app = typer.Typer(help="Show and validate configurations.", no_args_is_help=True)
    default_recipe = "finetune" if "finetune" in registries.recipes else None

    @app.command("show", context_settings={"allow_extra_args": False})
    def config_show(
        arguments: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
        config: list[str] = typer.Option([], "-c", "--config", help=CONFIG_HELP),
        recipe: Optional[str] = typer.Option(default_recipe, "--recipe", help="Recipe whose defaults apply."),
        sources: bool = typer.Option(True, "--sources/--no-sources", help="Comment each value with the layer that set it."),
    ) -> None:
        """Print the resolved config and which layer set each value."""
        from automodel_cli.config.assemble import resolve_command, split_arguments

        target, overrides = split_arguments(arguments or [])
        entry = registries.recipes.get(recipe) if recipe else None
        resolved = resolve_command(registries, recipe=entry, target=target,
                                   config_files=config, overrides=overrides)
        typer.echo(resolved.to_yaml(with_sources=sources), nl=False)

    @app.command("validate")
    def config_validate(
        files: list[str] = typer.Argument(..., help="YAML config files, layered in order."),
        recipe: Optional[str] = typer.Option(default_recipe, "--recipe", help="Recipe whose defaults apply."),
    ) -> None:
        """Check config files: unknown keys, wrong types and bad values, all reported at once."""
        from automodel_cli.config.assemble import resolve_command

        entry = registries.recipes.get(recipe) if recipe else None
        resolve_command(registries, recipe=entry, target=None, config_files=files)
        typer.echo(f"OK: {', '.join(files)}")

    return app


# ------------------------------------------------------------------------------- app
def build_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(name="automodel", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False,
                      # plain click help: typer's rich formatter imports more than the rest of
                      # `--help` costs (docs/benchmarks.md; see show_whole_summaries)
                      rich_markup_mode=None,
                      context_settings={"help_option_names": ["-h", "--help"]})
    registries = host.registries

    @app.callback(invoke_without_command=True)
    def root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit."),
        # Read by main() before the command line is parsed (the plugins decide which commands
        # exist); declared here for --help only.
        block_plugin: list[str] = typer.Option(
            [], "--block-plugin", metavar="NAME",
            help="Do not load this plugin (entry-point or distribution name); repeat for more. "
                 "Goes before the command. Adds to AUTOMODEL_BLOCK_PLUGINS and the settings file."),
        no_plugins: bool = typer.Option(
            False, "--no-plugins",
            help="Load only the built-in plugins (and those enabled by AUTOMODEL_PLUGINS or the "
                 "settings file), like AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD=1. Goes before the command."),
    ) -> None:
        if version:
            typer.echo(f"automodel-cli {__version__}")
            raise typer.Exit()

    for entry in registries.recipes:
        app.command(entry.name, help=entry.description)(recipe_command(entry, registries))
    app.command("plan")(plan_command(registries))
    app.command("evaluate")(evaluate_command(registries))
    app.add_typer(launch_app(registries), name="launch")
    app.add_typer(checkpoint_app, name="checkpoint")
    app.add_typer(convert_app, name="convert")
    app.add_typer(data_app, name="data")
    app.add_typer(_plugins_app(host), name="plugins")
    app.add_typer(_list_app(registries), name="list")
    app.add_typer(_config_app(registries), name="config")
    return app


def show_whole_summaries(command: Any) -> None:
    """Let every command listing show the whole first paragraph of each subcommand's help.

    Help is formatted by click, not rich (``rich_markup_mode=None``): importing typer's rich help
    costs more than the rest of ``automodel --help`` together. Click shortens each summary in a
    command list to the terminal width with "..."; an explicit ``short_help`` is shown whole and
    wrapped instead, as the rich formatter did.
    """
    for subcommand in getattr(command, "commands", {}).values():
        if not subcommand.short_help and subcommand.help:
            first_paragraph = inspect.cleandoc(subcommand.help).partition("\f")[0].partition("\n\n")[0]
            subcommand.short_help = " ".join(first_paragraph.split())
        show_whole_summaries(subcommand)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``automodel`` script; returns (and exits with) the exit code."""
    code = _run(argv)
    if argv is None:
        distributed = sys.modules.get("automodel_cli.components.distributed.env")
        if distributed is not None and distributed.process_group_destroyed():
            distributed.exit_process(code)  # a torchrun worker; see exit_process for why
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    from automodel_cli.components.torchao_import import quiet_torchao_import_noise

    quiet_torchao_import_noise()  # peft imports torchao (an optional extra) where it is installed
    host = None
    try:
        command_line, arguments = split_global_options(sys.argv[1:] if argv is None else list(argv))
        with host_for_command(command_line) as host, \
                warnings_shown_once(host, lambda line: typer.echo(line, err=True)):
            command = typer.main.get_command(build_app(host))
            show_whole_summaries(command)
            command(args=arguments, prog_name="automodel", standalone_mode=True)
    except UserError as error:
        from automodel_cli.components.launch.torchrun import report_to_launcher

        typer.echo(f"error: {error.render()}", err=True)
        report_to_launcher(error)
        return error.exit_code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception as exception:
        code = _report_plugin_crash(exception, host)
        if code is None:
            raise  # not raised in a plugin's code: our bug, with its traceback
        return code
    finally:
        _release_run_locks()
    return 0


def _report_plugin_crash(exception: Exception, host: PluginHost | None) -> int | None:
    """Report an exception raised in a plugin's code as one paragraph naming the plugin (and
    its traceback under AUTOMODEL_DEBUG=1) and return the exit code; None for any other."""
    from automodel_cli.plugin_errors import (
        PLUGIN_BUG_EXIT_CODE,
        debug_enabled,
        find_plugin_crash,
        format_traceback,
    )

    crash = find_plugin_crash(exception, host) if host is not None else None
    if crash is None:
        return None
    debug = debug_enabled()
    if debug:
        typer.echo(format_traceback(exception), err=True, nl=False)
    typer.echo(f"error: {crash.message(debug=debug)}", err=True)
    return PLUGIN_BUG_EXIT_CODE


def _release_run_locks() -> None:
    """Give up the output-directory lock a recipe took (only loaded when a recipe ran)."""
    run_lock = sys.modules.get("automodel_cli.components.training.run_lock")
    if run_lock is not None:
        run_lock.release_all()
