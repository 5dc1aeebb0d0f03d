"""Typed registries that plugins fill through the ``register_*`` hooks.

Every entry remembers the plugin (distribution and version) that added it, so listings and
errors can say "dataset squad from automodel-cli 0.1.0". Targets are usually ``"module:attr"``
strings resolved on first use, which keeps listing cheap (no torch import).

A second plugin may replace an existing name only with ``override=True``. Without it, a
third-party plugin reusing a built-in name is ignored for that name (the built-in stays in
charge; the host warns), and two third-party plugins sharing a name are a conflict: using that
name is an error naming both plugins, every other name keeps working.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Provider:
    """Who registered an entry: a plugin name and, for installed plugins, its distribution."""

    plugin: str
    distribution: str | None = None
    version: str | None = None
    #: Registered by automodel-cli itself.
    builtin: bool = False

    def __str__(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version or ''}".strip()
        return f"plugin {self.plugin}"


UNKNOWN_PROVIDER = Provider(plugin="<direct>")


@dataclass
class Entry:
    """One registered name: what it resolves to, who provided it and what it replaced."""

    kind: str
    name: str
    target: Any
    provider: Provider
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    replaces: Entry | None = None

    def load(self) -> Any:
        """Resolve the target: import a ``"module:attr"`` string, or return the object as is."""
        if not isinstance(self.target, str) or ":" not in self.target:
            return self.target
        module_name, _, attr_path = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(
                f"{self.kind} `{self.name}` from {self.provider} points to `{self.target}`, "
                f"which cannot be loaded ({type(exc).__name__}: {exc}).",
                "Reinstall that plugin or report the problem to its authors.",
            ) from exc
        return obj

    def target_repr(self) -> str:
        if isinstance(self.target, str):
            return self.target
        module = getattr(self.target, "__module__", None)
        qualname = getattr(self.target, "__qualname__", None)
        return f"{module}:{qualname}" if module and qualname else repr(self.target)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "target": self.target_repr(),
            "plugin": self.provider.plugin,
            "distribution": self.provider.distribution,
            "version": self.provider.version,
            "overrides": str(self.replaces.provider) if self.replaces else None,
            **{k: v for k, v in self.metadata.items() if _is_plain(v)},
        }


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict, tuple))


@dataclass
class Conflict:
    """Two plugins registered the same name and the later one did not ask to override."""

    kind: str
    name: str
    first: Entry
    second: Entry

    @property
    def keeps_builtin(self) -> bool:
        """A third-party plugin reused a built-in name: the built-in stays, the plugin's entry is
        ignored (a warning, not an error)."""
        return self.first.provider.builtin and not self.second.provider.builtin

    def message(self) -> str:
        second = self.second.provider
        if self.keeps_builtin:
            plugin = f"`{second.plugin}`" + (f" ({second})" if second.distribution else "")
            return (
                f"{self.kind} `{self.name}` is built in ({self.first.provider}); the plugin "
                f"{plugin} registers it too, without override=True, so its "
                f"{self.kind} is ignored and the built-in one is used. To replace the built-in, "
                f"the plugin registers it with override=True; to silence this, block the plugin "
                f"(--block-plugin {second.plugin} or AUTOMODEL_BLOCK_PLUGINS={second.plugin})."
            )
        return (
            f"{self.kind} `{self.name}` is registered by both {self.first.provider} and "
            f"{second}. Uninstall or block one of them (--block-plugin NAME or "
            f"AUTOMODEL_BLOCK_PLUGINS=NAME), or have the later plugin register it with "
            f"override=True."
        )

    def as_dict(self) -> dict[str, Any]:
        """The ignored or conflicting registration, for ``automodel list ... --json``."""
        provider = self.second.provider
        return {"plugin": provider.plugin, "distribution": provider.distribution,
                "version": provider.version,
                "effect": "ignored: collides with built-in" if self.keeps_builtin
                else "conflict: using the name is an error"}


class Registry:
    """Base registry: a name -> Entry map with provenance, overrides and conflicts."""

    #: Singular noun used in messages ("dataset").
    kind: str = "entry"
    #: Name of the ``automodel list`` sub-command and of the config section it serves.
    listing: str = "entries"
    #: Config key where users name an entry, for error messages.
    config_key: str | None = None

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self.conflicts: list[Conflict] = []
        self._provider = UNKNOWN_PROVIDER

    @contextmanager
    def provided_by(self, provider: Provider) -> Iterator[None]:
        """Attribute every ``add`` inside the block to ``provider`` (used by the plugin host)."""
        previous, self._provider = self._provider, provider
        try:
            yield
        finally:
            self._provider = previous

    def _add(
        self,
        name: str,
        target: Any,
        *,
        description: str = "",
        override: bool = False,
        **metadata: Any,
    ) -> Entry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if target is None:
            raise ValueError(f"{self.kind} `{name}` needs a target (a callable or 'module:attr')")
        entry = Entry(self.kind, name, target, self._provider, description, dict(metadata))
        existing = self._entries.get(name)
        if existing is not None:
            if not override:
                self.conflicts.append(Conflict(self.kind, name, existing, entry))
                return existing
            entry.replaces = existing
        self._entries[name] = entry
        return entry

    # The typed subclasses expose ``add`` with their own keyword arguments.
    def add(self, name: str, target: Any, *, description: str = "", override: bool = False) -> Entry:
        """Register ``name`` -> ``target`` (a callable or a ``"module:attr"`` string)."""
        return self._add(name, target, description=description, override=override)

    def get(self, name: str) -> Entry:
        """Look a name up; unknown or conflicting names raise a ``UserError`` that names the fix."""
        for conflict in self.conflicts:
            if conflict.name == name and not conflict.keeps_builtin:
                raise UserError(conflict.message())
        try:
            return self._entries[name]
        except KeyError:
            where = f" (set by `{self.config_key}`)" if self.config_key else ""
            available = ", ".join(sorted(self._entries)) or "none"
            raise UserError(
                f"Unknown {self.kind} `{name}`{where}.{did_you_mean(name, self._entries)}",
                f"Available: {available}. `automodel list {self.listing}` shows where each "
                f"comes from; a plugin package can add more.",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)


class RecipeRegistry(Registry):
    kind, listing = "recipe", "recipes"

    def add(  # type: ignore[override]
        self,
        name: str,
        target: str | Callable[..., int],
        *,
        description: str = "",
        defaults: dict[str, Any] | str | None = None,
        json_output: str | None = None,
        override: bool = False,
    ) -> Entry:
        """Register a recipe command.

        ``target(config) -> int`` runs the recipe. ``defaults`` (a nested dict or the path of a
        YAML file) is the lowest config layer for this recipe. ``json_output`` names a boolean
        config key that the command's ``--json`` flag sets (recipes that can print one JSON
        object for scripts); without it the command has no ``--json``.
        """
        return self._add(name, target, description=description, override=override, defaults=defaults,
                         json_output=json_output)


class ModelRegistry(Registry):
    kind, listing, config_key = "model preset", "models", "TARGET"

    def add(  # type: ignore[override]
        self,
        name: str,
        *,
        path: str,
        family: str,
        description: str = "",
        defaults: dict[str, Any] | None = None,
        recipe_defaults: dict[str, dict[str, Any]] | None = None,
        override: bool = False,
    ) -> Entry:
        """Register a preset: ``path`` is a hub id or local directory, ``family`` the model
        family (llama, qwen, ...), ``defaults`` config values applied when the preset is used,
        ``recipe_defaults`` recipe name -> config values applied on top when the preset runs
        with that recipe (the demo's distillation student is smaller than the demo model)."""
        return self._add(
            name, path, description=description, override=override,
            path=path, family=family, defaults=defaults or {}, recipe_defaults=recipe_defaults or {},
        )


class DatasetRegistry(Registry):
    kind, listing, config_key = "dataset", "datasets", "data.name"


class LossRegistry(Registry):
    kind, listing, config_key = "loss", "losses", "loss.name"


class ParallelPlanRegistry(Registry):
    kind, listing = "parallel plan", "parallel-plans"

    def add(  # type: ignore[override]
        self,
        model_type: str,
        target: Any,
        *,
        description: str = "",
        override: bool = False,
    ) -> Entry:
        """Register a tensor-parallel plan for a Hugging Face ``config.model_type``."""
        return self._add(model_type, target, description=description, override=override)


class LauncherRegistry(Registry):
    kind, listing, config_key = "launcher", "launchers", "launch.launcher"


class LoggerRegistry(Registry):
    kind, listing, config_key = "logger", "loggers", "logging.loggers"

    def add(  # type: ignore[override]
        self,
        name: str,
        target: Any,
        *,
        description: str = "",
        requires: tuple[str, ...] | list[str] = (),
        override: bool = False,
    ) -> Entry:
        """Register a logger; ``requires`` names optional modules it needs (for clear hints)."""
        return self._add(
            name, target, description=description, override=override, requires=list(requires)
        )


#: hook name -> registry class, in the order hooks are called.
REGISTRY_HOOKS: dict[str, type[Registry]] = {
    "register_recipes": RecipeRegistry,
    "register_models": ModelRegistry,
    "register_datasets": DatasetRegistry,
    "register_losses": LossRegistry,
    "register_parallel_plans": ParallelPlanRegistry,
    "register_launchers": LauncherRegistry,
    "register_loggers": LoggerRegistry,
}


class Registries:
    """All registries of one plugin host, by listing name (``recipes``, ``models``, ...)."""

    def __init__(self) -> None:
        self.by_hook: dict[str, Registry] = {hook: cls() for hook, cls in REGISTRY_HOOKS.items()}
        self.by_listing: dict[str, Registry] = {r.listing: r for r in self.by_hook.values()}

    recipes = property(lambda self: self.by_hook["register_recipes"])
    models = property(lambda self: self.by_hook["register_models"])
    datasets = property(lambda self: self.by_hook["register_datasets"])
    losses = property(lambda self: self.by_hook["register_losses"])
    parallel_plans = property(lambda self: self.by_hook["register_parallel_plans"])
    launchers = property(lambda self: self.by_hook["register_launchers"])
    loggers = property(lambda self: self.by_hook["register_loggers"])

    def conflicts(self) -> list[Conflict]:
        return [c for registry in self.by_hook.values() for c in registry.conflicts]
