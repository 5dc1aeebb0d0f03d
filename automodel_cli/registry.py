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
    #: The entry's option table: ``{name: Key}``, a ``"module:attr"`` naming one, or None.
    options: Any = None

    def option_table(self) -> dict[str, Any]:
        """The declared options (``{}`` when none), resolving a dotted path on first use. A
        recipe's table is its sections: ``{section: {key: Key}}``."""
        from automodel_cli.config.schema import Key

        table = self._resolve(self.options, "option table") if isinstance(self.options, str) else self.options
        table = table or {}
        bad = [] if isinstance(table, dict) else [type(table).__name__]
        for name, key in (table.items() if isinstance(table, dict) else []):
            nested = key.items() if isinstance(key, dict) and self.kind == "recipe" else [(name, key)]
            bad += [str(n) for n, k in nested if not isinstance(k, Key) or not isinstance(n, str)]
        if bad:
            raise UserError(
                f"The option table of {self.kind} `{self.name}` from {self.provider} is not a mapping of option "
                f"names to automodel_cli.config.Key (bad: {', '.join(bad)}).",
                "Report the problem to the plugin's authors: options are declared with automodel_cli.config.option().",
            )
        self.options = table
        return table

    def load(self) -> Any:
        """Resolve the target: import a ``"module:attr"`` string, or return the object as is."""
        if not isinstance(self.target, str) or ":" not in self.target:
            return self.target
        return self._resolve(self.target, "target")

    def _resolve(self, dotted: str, what: str) -> Any:
        try:
            obj = import_dotted(dotted)
        except (ImportError, AttributeError) as exc:
            raise UserError(
                f"{self.kind} `{self.name}` from {self.provider} points to `{dotted}` ({what}), "
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


def import_dotted(dotted: str) -> Any:
    """The object ``"module:attr.path"`` names (``ImportError``/``AttributeError`` when none)."""
    module_name, _, attr_path = dotted.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split(".") if attr_path else []:
        obj = getattr(obj, attr)
    return obj


def _check_option_name(section: str, name: str, kind: str) -> None:
    """An entry's options live at ``SECTION.NAME``: NAME must not be a core key of SECTION."""
    from automodel_cli.config.schema import CORE

    body = CORE.get(section)
    if isinstance(body, dict) and name in body:
        raise ValueError(f"{kind} `{name}` declares options, which would live at `{section}.{name}`: that is a "
                         f"core config key. Register the {kind} under another name.")


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
    #: Config section whose sub-mapping ``SECTION.NAME`` holds entry NAME's options.
    options_section: str | None = None

    @property
    def chosen_by(self) -> str | None:
        """The config key whose value chooses entries (their option tables are then filled)."""
        return self.config_key if self.config_key and "." in self.config_key else None

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
        options: Any = None,
        **metadata: Any,
    ) -> Entry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if target is None:
            raise ValueError(f"{self.kind} `{name}` needs a target (a callable or 'module:attr')")
        if options is not None and not isinstance(options, (dict, str)):
            raise ValueError(f"{self.kind} `{name}`: options must be a mapping of option names to Key, or "
                             f"'module:attr', got {type(options).__name__}")
        if options and self.options_section:
            _check_option_name(self.options_section, name, self.kind)
        entry = Entry(self.kind, name, target, self._provider, description, dict(metadata), options=options)
        existing = self._entries.get(name)
        if existing is not None:
            if not override:
                self.conflicts.append(Conflict(self.kind, name, existing, entry))
                return existing
            entry.replaces = existing
        self._entries[name] = entry
        return entry

    # The typed subclasses expose ``add`` with their own keyword arguments.
    def add(self, name: str, target: Any, *, description: str = "", override: bool = False,
            options: Any = None) -> Entry:
        """Register ``name`` -> ``target`` (a callable or a ``"module:attr"`` string). ``options``
        declares the entry's option table (``{name: Key}``), read from ``SECTION.NAME``."""
        return self._add(name, target, description=description, override=override, options=options)

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
        sections: dict[str, dict[str, Any]] | str | None = None,
        reads: tuple[str, ...] | list[str] | None = None,
        json_output: str | None = None,
        override: bool = False,
    ) -> Entry:
        """Register a recipe command.

        ``target(context) -> int`` runs the recipe. ``defaults`` (a nested dict or the path of
        a YAML file) is the lowest config layer for this recipe. ``sections`` declares the
        recipe's own config sections, ``{section: {key: Key}}`` (or ``"module:attr"`` naming
        that mapping): they exist only for this recipe and are validated like the core.
        ``reads`` lists the core sections the recipe reads (default: all); the others are left
        out of its resolved config. ``json_output`` names a boolean config key that the
        command's ``--json`` flag sets; without it the command has no ``--json``.
        """
        return self._add(name, target, description=description, override=override, defaults=defaults,
                         json_output=json_output, options=sections,
                         reads=tuple(reads) if reads is not None else None)


class ModelRegistry(Registry):
    kind, listing, config_key, options_section = "model preset", "models", "TARGET", "model"
    chosen_by = "model.preset"  # type: ignore[assignment]  # TARGET, recorded by the preset layer

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
        options: Any = None,
    ) -> Entry:
        """Register a preset: ``path`` is a hub id or local directory, ``family`` the model
        family (llama, qwen, ...), ``defaults`` config values applied when the preset is used,
        ``recipe_defaults`` recipe name -> config values applied on top when the preset runs
        with that recipe (the demo's distillation student is smaller than the demo model),
        ``options`` the preset's option table, read from ``model.NAME``."""
        return self._add(
            name, path, description=description, override=override, options=options,
            path=path, family=family, defaults=defaults or {}, recipe_defaults=recipe_defaults or {},
        )


class DatasetRegistry(Registry):
    kind, listing, config_key, options_section = "dataset", "datasets", "data.name", "data"


class LossRegistry(Registry):
    kind, listing, config_key, options_section = "loss", "losses", "loss.name", "loss"

    def add(self, name: str, target: Any, *, description: str = "", override: bool = False) -> Entry:  # type: ignore[override]
        """Register a loss: an ``automodel_cli.components.loss.spec.LossSpec`` (how to call the
        loss, its option table, its kernel check), or a plain logits loss function (a callable or
        ``"module:attr"``), which is used as ``LossSpec(kind="logits", fn=target)``. The entry's
        option table, read from ``loss.NAME``, is the spec's ``options``: declared in one place.
        A ``"module:attr"`` target is imported only when a run uses it, so a spec with options is
        registered as the object itself (declared with ``"module:attr"`` functions, it is light)."""
        options = None if isinstance(target, str) else getattr(target, "options", None)
        return self._add(name, target, description=description, override=override, options=options or None)


class ParallelPlanRegistry(Registry):
    kind, listing, options_section = "parallel plan", "parallel-plans", "distributed"

    def add(  # type: ignore[override]
        self,
        model_type: str,
        target: Any,
        *,
        description: str = "",
        override: bool = False,
        options: Any = None,
    ) -> Entry:
        """Register a tensor-parallel plan for a Hugging Face ``config.model_type``; its
        ``options`` are read from ``distributed.MODEL_TYPE``."""
        return self._add(model_type, target, description=description, override=override, options=options)


class LauncherRegistry(Registry):
    kind, listing, config_key, options_section = "launcher", "launchers", "launch.launcher", "launch"

    def add(self, name: str, target: Any, *, description: str = "", override: bool = False,  # type: ignore[override]
            options: Any = None) -> Entry:
        """Register a launcher (a ``Launcher`` subclass or ``"module:Class"``). Its option table,
        read from ``launch.NAME``, is the class's ``options`` unless ``options`` is given."""
        if options is None:
            options = f"{target}.options" if isinstance(target, str) else getattr(target, "options", None)
        return self._add(name, target, description=description, override=override, options=options)


class RequiringRegistry(Registry):
    """A kind whose entries may need optional packages (loggers, optimizers)."""

    def add(  # type: ignore[override]
        self,
        name: str,
        target: Any,
        *,
        description: str = "",
        requires: tuple[str, ...] | list[str] = (),
        override: bool = False,
        options: Any = None,
    ) -> Entry:
        """Register ``name`` -> ``target``; ``requires`` names optional modules it needs (for
        clear hints), ``options`` its option table, read from ``SECTION.NAME``."""
        return self._add(
            name, target, description=description, override=override, requires=list(requires), options=options
        )


class LoggerRegistry(RequiringRegistry):
    """Metric loggers: ``target(*, output_dir, options, run_config)`` returns the logger; options
    at ``logging.NAME``."""

    kind, listing, config_key, options_section = "logger", "loggers", "logging.loggers", "logging"


class MoeBlockRegistry(Registry):
    kind, listing = "MoE block", "moe-blocks"

    def add(self, name: str, target: Any, *, description: str = "", override: bool = False) -> Entry:  # type: ignore[override]
        """Register a kind of mixture-of-experts experts module: an
        ``automodel_cli.components.moe.experts.ExpertKind`` (or ``"module:attr"`` naming one) that
        says which modules it matches, which parameters hold one slice per expert, and how to
        compute tokens grouped by expert. Kinds from plugins are tried before the built-in ones."""
        return self._add(name, target, description=description, override=override)


class OptimizerRegistry(RequiringRegistry):
    """Optimizers: ``target(settings)`` (a callable or ``"module:attr"``) returns a
    ``torch.optim.Optimizer`` for ``settings``, an
    ``automodel_cli.components.optim.build.OptimizerSettings`` (the model, the peak rate, the
    general ``optim.*`` values and the entry's options, read from ``optim.NAME``)."""

    kind, listing, config_key, options_section = "optimizer", "optimizers", "optim.name", "optim"


class ScheduleRegistry(Registry):
    kind, listing, config_key, options_section = "learning-rate schedule", "schedulers", "optim.scheduler", "optim"

    def add(self, name: str, target: Any, *, description: str = "", override: bool = False,  # type: ignore[override]
            options: Any = None) -> Entry:
        """Register a learning-rate schedule: ``target(step, *, warmup, total, min_ratio,
        options) -> float`` (a callable or ``"module:attr"``), the multiplier of the peak rate at
        0-based ``step``; ``options`` is its option table, read from ``optim.NAME``."""
        return self._add(name, target, description=description, override=override, options=options)


#: hook name -> registry class, in the order hooks are called.
REGISTRY_HOOKS: dict[str, type[Registry]] = {
    "register_recipes": RecipeRegistry,
    "register_models": ModelRegistry,
    "register_datasets": DatasetRegistry,
    "register_losses": LossRegistry,
    "register_parallel_plans": ParallelPlanRegistry,
    "register_launchers": LauncherRegistry,
    "register_loggers": LoggerRegistry,
    "register_moe_blocks": MoeBlockRegistry,
    "register_optimizers": OptimizerRegistry,
    "register_schedulers": ScheduleRegistry,
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
    moe_blocks = property(lambda self: self.by_hook["register_moe_blocks"])
    optimizers = property(lambda self: self.by_hook["register_optimizers"])
    schedulers = property(lambda self: self.by_hook["register_schedulers"])

    def conflicts(self) -> list[Conflict]:
        return [c for registry in self.by_hook.values() for c in registry.conflicts]
