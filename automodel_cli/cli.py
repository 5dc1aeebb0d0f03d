"""The ``automodel`` command line.

Built-in commands (plugins, list, config) are defined here; every recipe registered through the
``register_recipes`` hook becomes a top-level command with the same common options. Building the
app loads plugin entry points but never torch, so ``automodel --help`` stays fast.
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
from automodel_cli.commands.launch import launch_app
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import PluginHost, PluginRecord, host_for_command, warnings_shown_once
from automodel_cli.plugin_settings import split_global_options
from automodel_cli.registry import Entry, Registries

HELP = (
    "Fine-tune, pre-train and distil Hugging Face models from one command, "
    "from one CPU to many GPU nodes. Plugins add models, datasets, losses, parallel plans, "
    "launchers and loggers."
)

ARGS_HELP = "TARGET (a model preset or a YAML file), then key=value overrides."
CONFIG_HELP = "YAML config file; repeat to layer several (later wins)."


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


# --------------------------------------------------------------------------- recipes
PEFT_HELP = "none, lora or dora (peft.method)."
NPROC_HELP = "Processes per node; > 1 starts torchrun (launch.nproc_per_node)."
GPUS_HELP = "GPUs per node: requests them from the cluster and runs one process per GPU (launch.gpus_per_node)."
NODES_HELP = "Nodes for the job; > 1 needs --launcher slurm or k8s (launch.nodes)."
LAUNCHER_HELP = "Where to run: local (default), slurm, k8s or a plugin's (launch.launcher)."
DRY_RUN_HELP = "Print the resolved config and the batch script or manifest; run nothing."


#: Options shared by the recipe commands and `automodel launch FILE` (OptionInfo objects are
#: plain declarations, so one instance can serve several commands).
CONFIG_OPTION = typer.Option([], "-c", "--config", help=CONFIG_HELP)
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

    resolved = resolve_command(registries, recipe=entry, target=target, config_files=config_files,
                               flags=flags, overrides=overrides)
    named = resolved.get("recipe")
    if named and named != entry.name:  # a config written for another recipe is not silently reused
        raise UserError(f"{resolved.source_of('recipe')}: this config is for the `{named}` recipe, not "
                        f"`{entry.name}`.",
                        f"Run `automodel {named} ...` or `automodel launch FILE`, or change `recipe:`.")
    code = start(entry, resolved, registries, dry_run=dry_run, echo=lambda text: typer.echo(text, nl=False))
    if code:
        raise typer.Exit(code)


def _recipe_command(entry: Entry, registries: Registries):
    """A top-level command that resolves the config and hands it to the recipe's launcher."""

    def command(
        arguments: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
        config: list[str] = CONFIG_OPTION,
        peft: Optional[str] = typer.Option(None, "--peft", help=PEFT_HELP),
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
        app.command(entry.name, help=entry.description)(_recipe_command(entry, registries))
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
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
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
