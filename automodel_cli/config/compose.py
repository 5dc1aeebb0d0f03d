"""The schema of one command, composed from the core and what is installed.

The core sections (``schema.CORE``) are the same for every recipe. A recipe adds its own
sections (``registry.add(..., sections={"distill": {...}})``) and may read only some core ones
(``reads=``); every registry entry may declare an option table, which lives at
``SECTION.NAME`` (``loss.linear_ce``, ``logging.wandb``, ``launch.slurm``, ``data.my_set``).
One validator checks the whole composed tree, so a plugin's options get the same types,
ranges, defaults, docs and "did you mean" as the core keys.

Option tables are filled with their defaults once an entry is chosen (``complete``), and code
reads an entry's options through ``entry_options`` (defaults included whatever the config says).
"""

from __future__ import annotations

import sys
from typing import Any

from automodel_cli.config.schema import (COMMAND_RECIPE_SECTIONS, COMMAND_SECTIONS, CORE, Key, OptionTable, Schema,
                                         copy_value)
from automodel_cli.config.yaml_io import Source
from automodel_cli.errors import UserError

#: Problems with plugins' option tables already reported in this process (warned once).
_REPORTED: set[str] = set()


def compose_schema(registries: Any, recipe: Any = None, *, launched: bool = False) -> Schema:
    """The core sections ``recipe`` reads, its own sections, and every entry's option table.

    ``launched``: the config of a process a launcher started (torchrun on a node). Its
    ``launch`` section was the launcher's business, and the launcher that wrote it (a plugin's)
    need not be installed where the job runs, so unknown ``launch`` keys are let through."""
    reads = recipe.metadata.get("reads") if recipe is not None else None
    tree: dict[str, Any] = {}
    for section, body in CORE.items():
        if isinstance(body, Key):
            tree[section] = body
        elif reads is None or section in reads:
            tree[section] = dict(body)
    own: dict[str, str] = {}
    if recipe is not None:
        for section, table in _table(recipe).items():
            if section in CORE:
                _report(f"recipe `{recipe.name}` from {recipe.provider} declares the section `{section}`, which is "
                        f"a core section; its declaration is ignored.")
                continue
            tree[section] = dict(table)
            own[section] = recipe.name
    foreign = {section: entry.name for entry in registries.recipes if recipe is None or entry.name != recipe.name
               for section in _table(entry) if section not in CORE and section not in own}
    tables: dict[str, OptionTable] = {}
    for registry in registries.by_hook.values():
        section = registry.options_section
        if not section or section not in tree:
            continue
        for entry in registry:
            table = _table(entry)
            if not table or entry.name in CORE.get(section, {}):
                continue
            path = f"{section}.{entry.name}"
            if path in tables:  # two kinds share the section (optimizers and schedules: `optim`)
                _report(f"{registry.kind} `{entry.name}` from {entry.provider} declares options at `{path}`, where "
                        f"{tables[path].kind} `{entry.name}` ({tables[path].provider}) has its own; its options are "
                        f"ignored. Register it under another name.")
                continue
            tree[section][entry.name] = dict(table)
            tables[path] = OptionTable(path, registry.kind, entry.name, str(entry.provider), registry.chosen_by)
    return Schema(tree, tables, own, foreign, lenient=("launch",) if launched else ())


def command_schema(registries: Any, command: str) -> Schema:
    """The schema of built-in command ``command`` that is not a recipe (``automodel evaluate``):
    the core sections, every entry's option table, the command's own sections
    (``schema.COMMAND_SECTIONS``) and the installed recipes' sections it also reads
    (``schema.COMMAND_RECIPE_SECTIONS``)."""
    schema = compose_schema(registries)
    for section, table in COMMAND_SECTIONS[command].items():
        schema.tree[section] = dict(table)
        schema.recipe_sections[section] = command
    for section in COMMAND_RECIPE_SECTIONS.get(command, ()):
        recipe = schema.foreign_sections.pop(section, None)
        if recipe is not None:
            schema.tree[section] = dict(_table(registries.recipes.get(recipe))[section])
            schema.recipe_sections[section] = command
    return Schema(schema.tree, schema.tables, schema.recipe_sections, schema.foreign_sections)


def _table(entry: Any) -> dict[str, Any]:
    """An entry's option table; a broken one is reported once and treated as empty, so one
    plugin's mistake does not stop commands that never use it."""
    try:
        return entry.option_table()
    except UserError as error:
        _report(error.render())
        return {}


def _report(message: str) -> None:
    if message not in _REPORTED:
        _REPORTED.add(message)
        print(f"automodel: warning: {message}", file=sys.stderr)


def chosen(cfg: Any, table: OptionTable) -> bool:
    """Whether the config chooses the table's entry (``loss.name: linear_ce``, a logger listed
    in ``logging.loggers``, ...)."""
    if table.selected_by is None:
        return False
    value = cfg.get(table.selected_by)
    return table.name in value if isinstance(value, list) else table.name == value


def complete(cfg: Any) -> None:
    """Fill the option tables of the chosen entries with their defaults, so the resolved config
    (and ``config show``) holds every option the run will use, with where it came from."""
    for path, table in cfg.schema.tables.items():
        if not chosen(cfg, table):
            continue
        node = cfg.tree
        for part in path.split("."):
            node = node.setdefault(part, {})
        for name, default in cfg.schema.table_defaults(path).items():
            if name not in node:
                node[name] = default
                cfg.sources[f"{path}.{name}"] = Source(f"defaults of {table.kind} {table.name} ({table.provider})")


def entry_options(cfg: Any, registry: Any, name: str) -> dict[str, Any]:
    """Entry ``name``'s options: its declared defaults overlaid with ``SECTION.NAME`` of the
    config (already validated). ``{}`` for an entry without an option table."""
    given = cfg.get(f"{registry.options_section}.{name}") if registry.options_section else None
    return options_with_defaults(registry.get(name), given)


def options_with_defaults(entry: Any, given: Any) -> dict[str, Any]:
    """``entry``'s declared option defaults overlaid with ``given`` (a mapping, a config section
    view, or None): what a run uses, also for a saved config compared on resume."""
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    return {**{key: copy_value(spec.default) for key, spec in entry.option_table().items()}, **given}


def builtin_schema(registries: Any) -> Schema:
    """The schema docs/config.md documents: the core, every built-in recipe's sections and every
    built-in entry's option table (third-party plugins document their own)."""
    from automodel_cli.registry import Registries

    builtins = Registries()
    for hook, registry in registries.by_hook.items():
        for entry in registry:
            if entry.provider.distribution == "automodel-cli":
                builtins.by_hook[hook]._entries[entry.name] = entry
    everything = compose_schema(builtins)
    for entry in builtins.recipes:
        for section, table in _table(entry).items():
            everything.tree.setdefault(section, dict(table))
            everything.recipe_sections[section] = entry.name
    for command, sections in COMMAND_SECTIONS.items():
        for section, table in sections.items():
            everything.tree.setdefault(section, dict(table))
            everything.recipe_sections[section] = command
    return Schema(everything.tree, everything.tables, everything.recipe_sections)


if __name__ == "__main__":  # python -m automodel_cli.config.compose: the key tables of docs/config.md
    from automodel_cli.plugin_host import get_registries

    print(builtin_schema(get_registries()).markdown(), end="")
