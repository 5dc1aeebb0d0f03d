"""Which plugins to load: the command line, environment variables and the user settings file.

Three layers can block plugins or turn autoload off, highest first:

1. the global options ``automodel --block-plugin NAME --no-plugins COMMAND ...``;
2. the environment: ``AUTOMODEL_BLOCK_PLUGINS``, ``AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD``,
   ``AUTOMODEL_PLUGINS``;
3. the settings file, ``$AUTOMODEL_CONFIG_DIR/settings.yaml`` (default
   ``$XDG_CONFIG_HOME/automodel/settings.yaml``, i.e. ``~/.config/automodel/settings.yaml``)::

       plugins:
         block: [some-plugin]   # never load these
         autoload: false        # load only the built-ins ...
         enable: [other]        # ... and these

Block and enable lists add up across layers (a plugin blocked anywhere is blocked, and records
the highest layer that blocked it); ``autoload`` comes from the highest layer that sets it. The
settings file is read (with ruamel.yaml) only when it exists, so ``automodel --help`` stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError, did_you_mean

ENV_STRICT = "AUTOMODEL_PLUGINS_STRICT"
ENV_DISABLE_AUTOLOAD = "AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD"
ENV_ENABLE = "AUTOMODEL_PLUGINS"
ENV_BLOCK = "AUTOMODEL_BLOCK_PLUGINS"
ENV_CONFIG_DIR = "AUTOMODEL_CONFIG_DIR"
SETTINGS_FILE = "settings.yaml"

BLOCK_OPTION = "--block-plugin"
NO_PLUGINS_OPTION = "--no-plugins"
GLOBAL_OPTIONS = (BLOCK_OPTION, NO_PLUGINS_OPTION)

_TRUE = {"1", "true", "yes", "on"}
_SETTINGS_KEYS = {"block", "autoload", "enable"}


def normalize(name: str) -> str:
    """Plugin and distribution names compare case- and separator-insensitively (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _env_names(name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class Layer:
    """One source of plugin settings; ``source`` says where (an option, a variable, a file)."""

    source: str
    autoload: bool | None = None
    enabled: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.autoload is not None or bool(self.enabled or self.blocked)

    def exported(self) -> dict[str, str]:
        """The environment that passes this layer on to the processes a command starts
        (torchrun ranks run ``automodel`` again, without the command line's global options)."""
        env = {}
        if self.blocked:
            env[ENV_BLOCK] = ",".join([*_env_names(ENV_BLOCK), *self.blocked])
        if self.autoload is False:
            env[ENV_DISABLE_AUTOLOAD] = "1"
        return env


@dataclass(frozen=True)
class PluginSettings:
    """The layers, highest first, and what they add up to."""

    layers: tuple[Layer, ...] = ()
    strict: bool = False

    @property
    def autoload(self) -> bool:
        return next((layer.autoload for layer in self.layers if layer.autoload is not None), True)

    @property
    def enabled(self) -> set[str]:
        return {normalize(name) for layer in self.layers for name in layer.enabled}

    def blocked_by(self, names: set[str]) -> str | None:
        """The highest layer that blocks any of ``names`` (normalized), or None."""
        for layer in self.layers:
            if names & {normalize(name) for name in layer.blocked}:
                return layer.source
        return None

    def on_top(self, layer: Layer | None) -> PluginSettings:
        return PluginSettings((layer, *self.layers), self.strict) if layer else self


def load_settings(command_line: Layer | None = None) -> PluginSettings:
    """Settings from the command line (if any), the environment and the settings file."""
    layers = [command_line, _environment_layer(), _file_layer(settings_path())]
    return PluginSettings(tuple(layer for layer in layers if layer), strict=env_flag(ENV_STRICT))


def _environment_layer() -> Layer:
    disable = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower()
    return Layer(
        source=ENV_BLOCK,
        autoload=None if not disable else disable not in _TRUE,
        enabled=_env_names(ENV_ENABLE),
        blocked=_env_names(ENV_BLOCK),
    )


def settings_path() -> Path:
    """``$AUTOMODEL_CONFIG_DIR/settings.yaml``, else under ``$XDG_CONFIG_HOME`` or ``~/.config``."""
    directory = os.environ.get(ENV_CONFIG_DIR)
    if not directory:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        directory = os.path.join(base, "automodel")
    return Path(directory) / SETTINGS_FILE


def _file_layer(path: Path) -> Layer | None:
    if not path.is_file():  # the common case: no ruamel import, no parsing
        return None
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        document = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as exc:
        problem = " ".join(str(exc).split())
        raise UserError(f"Cannot read the settings file `{path}`: {problem}.",
                        f"Fix it, or move it away (its location is ${ENV_CONFIG_DIR}/{SETTINGS_FILE}).") from None
    return _layer_from_document(document, str(path))


def _layer_from_document(document: Any, source: str) -> Layer | None:
    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise UserError(f"{source}: the settings file must be a mapping with a `plugins:` section.")
    for key in document:
        if key != "plugins":
            raise UserError(f"{source}: unknown setting `{key}`.{did_you_mean(str(key), ['plugins'])}",
                            "The settings file knows `plugins:` (block, autoload, enable).")
    plugins = document.get("plugins") or {}
    if not isinstance(plugins, Mapping):
        raise UserError(f"{source}: `plugins` must be a mapping (block, autoload, enable).")
    for key in plugins:
        if key not in _SETTINGS_KEYS:
            raise UserError(f"{source}: unknown setting `plugins.{key}`.{did_you_mean(str(key), _SETTINGS_KEYS)}",
                            f"Known: {', '.join(sorted(_SETTINGS_KEYS))}.")
    autoload = plugins.get("autoload")
    if autoload is not None and not isinstance(autoload, bool):
        raise UserError(f"{source}: `plugins.autoload` must be true or false, got {autoload!r}.")
    return Layer(source, autoload, _names(plugins, "enable", source), _names(plugins, "block", source))


def _names(plugins: Mapping[str, Any], key: str, source: str) -> tuple[str, ...]:
    value = plugins.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(name, str) and name.strip() for name in value):
        raise UserError(f"{source}: `plugins.{key}` must be a list of plugin or distribution names, "
                        f"got {value!r}.")
    return tuple(value)


# ----------------------------------------------------------------------- command line
def split_global_options(argv: list[str]) -> tuple[Layer | None, list[str]]:
    """Take ``--block-plugin NAME`` and ``--no-plugins`` off the front of ``argv``.

    They must come before the command (``automodel --block-plugin x finetune ...``): the plugins
    decide which commands exist, so they are applied before the command line is parsed. After the
    command the same words are an error that says where they go.
    """
    blocked: list[str] = []
    no_plugins = False
    rest: list[str] = []
    arguments = iter(argv)
    for token in arguments:
        if not token.startswith("-"):  # the command: everything from here on is its own
            rest.append(token)
            break
        if token == NO_PLUGINS_OPTION:
            no_plugins = True
        elif token == BLOCK_OPTION or token.startswith(BLOCK_OPTION + "="):
            name = token.partition("=")[2] if "=" in token else next(arguments, "")
            if not name.strip() or name.startswith("-"):
                raise UserError(f"{BLOCK_OPTION} needs a plugin name.",
                                f"Write `automodel {BLOCK_OPTION} NAME COMMAND ...` (entry-point or "
                                f"distribution name, see `automodel plugins list`).")
            blocked.append(name)
        else:
            rest.append(token)
    rest.extend(arguments)
    _refuse_late_global_options(rest)
    if not blocked and not no_plugins:
        return None, rest
    return Layer("--block-plugin" if blocked else NO_PLUGINS_OPTION,
                 autoload=False if no_plugins else None, blocked=tuple(blocked)), rest


def _refuse_late_global_options(arguments: list[str]) -> None:
    for token in arguments:
        if token == "--":
            return
        option = token.partition("=")[0]
        if option in GLOBAL_OPTIONS:
            raise UserError(f"`{option}` is a global option and goes before the command.",
                            f"Write `automodel {option}{' NAME' if option == BLOCK_OPTION else ''} "
                            f"COMMAND ...`.")


@contextmanager
def exported_environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for a block and restore what was there afterwards."""
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

