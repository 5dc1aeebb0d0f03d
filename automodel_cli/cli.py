"""The ``automodel`` command line.

Built-in commands (plugins, list, config) are defined here; every recipe registered through the
``register_recipes`` hook becomes a top-level command with the same common options. Building the
app loads plugin entry points but never torch, so ``automodel --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from automodel_cli import __version__
from automodel_cli.commands.checkpoint import checkpoint_app
from automodel_cli.commands.convert import convert_app
from automodel_cli.components.launch.torchrun import inside_torchrun, report_to_launcher
from automodel_cli.config.assemble import resolve_command, split_arguments
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import PluginHost, get_host
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
        rows = [{**r.as_dict(), "status": _status_text(r.status, r.errors)} for r in records]
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
                typer.echo(f"  {record.name} ({record.distribution or '-'}): {record.status}")
        if not host.problems:
            typer.echo("No problems found.")
            return
        typer.echo(f"{len(host.problems)} problem(s):")
        for problem in host.problems:
            typer.echo(f"  - {problem}")
        raise typer.Exit(1)

    return app


def _status_text(status: str, errors: list[str]) -> str:
    return f"{status}: {errors[-1]}" if errors else status


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
        if as_json:
            _echo_json(rows)
            return
        for row in rows:
            row["provider"] = f"{row['distribution']} {row['version'] or ''}".strip() \
                if row["distribution"] else row["plugin"]
        columns = [("name", "Name"), ("description", "Description")]
        if listing == "models":
            columns += [("path", "Path"), ("family", "Family")]
        columns += [("provider", "From"), ("overrides", "Overrides")]
        if not rows:
            typer.echo(f"No {listing} registered.")
            return
        _print_table(rows, columns, title=listing.capitalize())

    return command


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
        entry = registries.recipes.get(recipe) if recipe else None
        resolve_command(registries, recipe=entry, target=None, config_files=files)
        typer.echo(f"OK: {', '.join(files)}")

    return app


# --------------------------------------------------------------------------- recipes
def _recipe_command(entry: Entry, registries: Registries):
    """A top-level command that resolves the config and hands it to the recipe."""

    def command(
        arguments: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
        config: list[str] = typer.Option([], "-c", "--config", help=CONFIG_HELP),
        peft: Optional[str] = typer.Option(None, "--peft", help="none, lora or dora (peft.method)."),
        nproc_per_node: Optional[int] = typer.Option(
            None, "--nproc-per-node", "--gpus-per-node",
            help="Processes on this machine; > 1 starts torchrun (launch.nproc_per_node)."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Output directory (output_dir)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and stop."),
    ) -> None:
        target, overrides = split_arguments(arguments or [])
        flags = {
            "peft.method": ("--peft", peft),
            "launch.nproc_per_node": ("--nproc-per-node", nproc_per_node),
            "output_dir": ("--output-dir", output_dir),
        }
        resolved = resolve_command(registries, recipe=entry, target=target, config_files=config,
                                   flags=flags, overrides=overrides)
        if dry_run:
            typer.echo(resolved.to_yaml(with_sources=True), nl=False)
            return
        nproc = resolved.get("launch.nproc_per_node")
        if nproc and nproc > 1 and not inside_torchrun():
            from automodel_cli.components.launch.torchrun import run_torchrun
            from automodel_cli.components.training.run_dir import prepare_output_dir

            from automodel_cli.components.distributed.mesh import MeshShape

            dist = resolved.distributed
            MeshShape.resolve(dist.dp_replicate, dist.dp_shard, dist.tp, world_size=nproc)
            output_dir = prepare_output_dir(resolved, entry.name)
            raise typer.Exit(run_torchrun(entry.name, resolved, output_dir, nproc))
        run = entry.load()
        code = run(resolved)
        if code:
            raise typer.Exit(code)

    command.__doc__ = entry.description or f"Run the {entry.name} recipe."
    return command


# ------------------------------------------------------------------------------- app
def build_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(name="automodel", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    registries = host.registries

    @app.callback(invoke_without_command=True)
    def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
        if version:
            typer.echo(f"automodel-cli {__version__}")
            raise typer.Exit()

    for entry in registries.recipes:
        app.command(entry.name, help=entry.description)(_recipe_command(entry, registries))
    app.add_typer(checkpoint_app, name="checkpoint")
    app.add_typer(convert_app, name="convert")
    app.add_typer(_plugins_app(host), name="plugins")
    app.add_typer(_list_app(registries), name="list")
    app.add_typer(_config_app(registries), name="config")
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``automodel`` script; returns (and exits with) the exit code."""
    code = _run(argv)
    if argv is None:
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    try:
        host = get_host()
        for line in host.warning_lines():
            typer.echo(line, err=True)
        app = build_app(host)
        app(args=argv, prog_name="automodel", standalone_mode=True)
    except UserError as error:
        typer.echo(f"error: {error.render()}", err=True)
        report_to_launcher(error)
        return error.exit_code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
