"""Turn a command line (recipe, TARGET, -c files, flags, key=value) into config layers."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

from automodel_cli.config.resolve import (
    COMMAND_LINE,
    ConfigError,
    Problem,
    Layer,
    ResolvedConfig,
    defaults_layer,
    layer_from_file,
    layer_from_overrides,
    resolve,
)
from automodel_cli.config.compose import complete, compose_schema
from automodel_cli.config.schema import CORE, CORE_SCHEMA, Schema, set_dotted
from automodel_cli.config.yaml_io import Source
from automodel_cli.errors import UserError, did_you_mean
from automodel_cli.registry import Entry, Registries
from automodel_cli.runtime import inside_torchrun

YAML_SUFFIXES = (".yaml", ".yml")


def split_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """Split positional arguments into an optional TARGET (first one without '=') and overrides."""
    target: str | None = None
    overrides: list[str] = []
    for argument in arguments:
        if "=" in argument:
            overrides.append(argument)
        elif target is None:
            target = argument
        elif _looks_like_key(argument):
            raise _missing_equals(argument)
        else:
            raise UserError(
                f"Unexpected argument `{argument}` after TARGET `{target}`.",
                "Pass one model preset or YAML file as TARGET; settings are written key=value "
                "and extra files with -c FILE.",
            )
    return target, overrides


def recipe_layer(recipe: Entry) -> Layer | None:
    defaults = recipe.metadata.get("defaults")
    if not defaults:
        return None
    if isinstance(defaults, str):
        layer = layer_from_file(defaults)
        layer.label = f"recipe {recipe.name}"
        return layer
    return Layer(label=f"recipe {recipe.name}", data=defaults)


def preset_layers(name: str, registries: Registries, recipe: Entry | None = None) -> list[Layer]:
    """The preset's defaults and ``model.path``, then what the preset sets for ``recipe``."""
    if name not in registries.models and _looks_like_key(name):
        raise _missing_equals(name)
    preset = registries.models.get(name)
    data: dict[str, Any] = {}
    for section, values in preset.metadata.get("defaults", {}).items():
        data[section] = dict(values) if isinstance(values, dict) else values
    data.setdefault("model", {})["path"] = preset.metadata["path"]
    data["model"]["preset"] = name
    layers = [Layer(label=f"preset {name} ({preset.provider})", data=data)]
    for_recipe = preset.metadata.get("recipe_defaults", {}).get(recipe.name) if recipe is not None else None
    if for_recipe:
        layers.append(Layer(label=f"preset {name} for {recipe.name} ({preset.provider})", data=deepcopy(for_recipe)))
    return layers


def _looks_like_key(text: str) -> bool:
    """A config key (``train.max_steps``) or a section (``train``) given without ``=value``."""
    return text in CORE or CORE_SCHEMA.spec_for(text) is not None or CORE_SCHEMA.node(text) is not None


def _missing_equals(argument: str) -> UserError:
    return UserError(f"`{argument}` looks like a config override missing `=`, not a model preset or YAML file.",
                     f"Write it as {argument}=VALUE; TARGET is a model preset (`automodel list models`) or a "
                     f"YAML file, given once before the overrides.")


def is_yaml_target(target: str) -> bool:
    return target.endswith(YAML_SUFFIXES) or Path(target).is_file()


def flags_layer(flags: dict[str, tuple[str, Any]]) -> Layer:
    """Layer for named options such as --peft: dotted key -> (flag text, value)."""
    data: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for dotted, (text, value) in flags.items():
        if value is None:
            continue
        set_dotted(data, dotted, value)
        texts[dotted] = text
    return Layer(label=COMMAND_LINE, data=data, overrides=texts)


def build_layers(
    registries: Registries,
    *,
    recipe: Entry | None,
    target: str | None,
    config_files: list[str],
    flags: dict[str, tuple[str, Any]] | None = None,
    overrides: list[str] | None = None,
    schema: Schema = CORE_SCHEMA,
) -> list[Layer]:
    layers = [defaults_layer(schema)]
    if recipe is not None and (layer := recipe_layer(recipe)) is not None:
        layers.append(layer)
    files = list(config_files)
    if target is not None:
        if is_yaml_target(target):
            files.insert(0, target)
        else:
            layers.extend(preset_layers(target, registries, recipe))
    layers.extend(layer_from_file(str(path)) for path in files)
    if flags:
        layers.append(flags_layer(flags))
    if overrides:
        layers.append(layer_from_overrides(overrides, schema))
    return layers


#: Values that mean "choose for me" rather than naming an entry.
AUTO_VALUES = {"data.name": {"auto"}}


def check_registry_names(resolved: ResolvedConfig, registries: Registries) -> None:
    """Every registry name in the config must exist: report all unknown ones at once."""
    problems: list[Problem] = []
    for registry in registries.by_hook.values():
        dotted, listing = registry.config_key, registry.listing
        if not dotted or "." not in dotted or dotted.split(".")[0] not in resolved.tree:
            continue  # named elsewhere (TARGET), or a section this recipe does not read
        if dotted == "launch.launcher" and inside_torchrun():
            continue  # a launched process runs the recipe; its launcher need not be installed here
        value = resolved.get(dotted)
        for name in value if isinstance(value, list) else [value]:
            if name is None or name in AUTO_VALUES.get(dotted, set()) or name in registry:
                continue
            suggestion = did_you_mean(str(name), registry.names())
            available = ", ".join(registry.names()) or "none"
            problems.append(Problem(
                resolved.source_of(dotted) or Source("config"), dotted,
                f"`{dotted}` names unknown {registry.kind} `{name}`.{suggestion} "
                f"Available: {available} (`automodel list {listing}`; plugins can add more).",
            ))
    if problems:
        raise ConfigError(problems)


def resolve_command(registries: Registries, **kwargs: Any) -> ResolvedConfig:
    """Compose the recipe's schema, build the layers of a command, merge and validate them,
    check registry names and fill the chosen entries' option defaults."""
    schema = compose_schema(registries, kwargs.get("recipe"), launched=inside_torchrun())
    resolved = resolve(build_layers(registries, schema=schema, **kwargs), schema)
    check_registry_names(resolved, registries)
    complete(resolved)
    recipe = kwargs.get("recipe")
    if recipe is not None and resolved.tree.get("recipe") is None:  # plugins and loggers can tell
        resolved.tree["recipe"] = recipe.name
        resolved.sources["recipe"] = Source(f"the {recipe.name} command")
    return resolved
