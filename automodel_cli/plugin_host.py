"""The plugin host: loads entry points one at a time and fills the registries.

Lessons from pytest and simonw/llm: built-ins load through the same entry-point path as
third-party plugins; a plugin that fails to import or register is recorded and reported, never
allowed to break ``--help`` or unrelated commands; environment variables give a strict mode, a
way to turn autoload off and a block list.

Environment variables
    AUTOMODEL_PLUGINS_STRICT=1          re-raise plugin errors instead of reporting them
    AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD=1 load only built-ins (plus those in AUTOMODEL_PLUGINS)
    AUTOMODEL_PLUGINS=a,b               third-party plugins to load even with autoload off
    AUTOMODEL_BLOCK_PLUGINS=a,b         never load these (entry-point or distribution names)
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from automodel_cli import PROJECT_NAME, hookspecs
from automodel_cli.errors import did_you_mean
from automodel_cli.registry import REGISTRY_HOOKS, Provider, Registries

ENTRY_POINT_GROUP = PROJECT_NAME
BUILTIN_DISTRIBUTION = "automodel-cli"

ENV_STRICT = "AUTOMODEL_PLUGINS_STRICT"
ENV_DISABLE_AUTOLOAD = "AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD"
ENV_ENABLE = "AUTOMODEL_PLUGINS"
ENV_BLOCK = "AUTOMODEL_BLOCK_PLUGINS"

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _env_names(name: str) -> set[str]:
    return {_normalize(part) for part in os.environ.get(name, "").split(",") if part.strip()}


def _normalize(name: str) -> str:
    """Distribution names compare case- and separator-insensitively (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


class PluginError(Exception):
    """Raised in strict mode for problems that have no original exception (conflicts, typos)."""


@dataclass
class PluginRecord:
    """What the host knows about one plugin, for ``plugins list`` and ``plugins doctor``."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    builtin: bool = False
    status: str = "loaded"  # loaded | error | blocked | not-loaded
    errors: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    plugin: Any = None

    @property
    def provider(self) -> Provider:
        return Provider(self.name, self.distribution, self.version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "status": self.status,
            "hooks": self.hooks,
            "errors": self.errors,
        }


@dataclass
class Problem:
    """One thing ``plugins doctor`` reports."""

    kind: str  # load-error | hook-error | conflict | unknown-hook
    plugin: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.plugin}: {self.message}"


def _describe_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class PluginHost:
    """Owns the pluggy manager, the plugin records and the registries built from them."""

    def __init__(
        self,
        *,
        strict: bool | None = None,
        autoload: bool | None = None,
        enabled: set[str] | None = None,
        blocked: set[str] | None = None,
    ) -> None:
        self.strict = _env_flag(ENV_STRICT) if strict is None else strict
        self.autoload = (not _env_flag(ENV_DISABLE_AUTOLOAD)) if autoload is None else autoload
        self.enabled = _env_names(ENV_ENABLE) if enabled is None else enabled
        self.blocked = _env_names(ENV_BLOCK) if blocked is None else blocked
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.registries = Registries()
        self.problems: list[Problem] = []

    # ----------------------------------------------------------------- loading plugins
    def load_entry_points(self) -> None:
        """Load every ``automodel`` entry point, one at a time, recording failures."""
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_entry_point_order):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            record = PluginRecord(
                name=ep.name,
                distribution=dist_name,
                version=dist.version if dist is not None else None,
                module=ep.value,
                builtin=dist_name is not None and _normalize(dist_name) == BUILTIN_DISTRIBUTION,
            )
            self.records.append(record)
            if self._is_blocked(record):
                record.status = "blocked"
                continue
            if not record.builtin and not self.autoload and not self._is_enabled(record):
                record.status = "not-loaded"
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the host
                self._fail(record, "load-error", exc)
                continue
            self._register(record, plugin)

    def register(
        self,
        plugin: Any,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginRecord:
        """Register a plugin object directly (tests, embedding applications)."""
        record = PluginRecord(
            name=name or getattr(plugin, "__name__", None) or type(plugin).__name__,
            distribution=distribution,
            version=version,
            module=getattr(plugin, "__name__", None),
        )
        self.records.append(record)
        self._register(record, plugin)
        return record

    def unregister(self, record: PluginRecord) -> None:
        if record.plugin is not None and self.pm.is_registered(record.plugin):
            self.pm.unregister(record.plugin)
        self.records.remove(record)

    def _register(self, record: PluginRecord, plugin: Any) -> None:
        try:
            self.pm.register(plugin, name=f"{record.name}:{id(plugin)}")
        except Exception as exc:  # e.g. a hookimpl whose arguments do not match its spec
            self._fail(record, "load-error", exc)
            return
        record.plugin = plugin
        record.status = "loaded"
        record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def _is_blocked(self, record: PluginRecord) -> bool:
        names = {_normalize(record.name)}
        if record.distribution:
            names.add(_normalize(record.distribution))
        return bool(names & self.blocked)

    def _is_enabled(self, record: PluginRecord) -> bool:
        names = {_normalize(record.name)}
        if record.distribution:
            names.add(_normalize(record.distribution))
        return bool(names & self.enabled)

    def _fail(self, record: PluginRecord, kind: str, exc: BaseException) -> None:
        if self.strict:
            raise exc
        record.status = "error"
        message = _describe_exception(exc)
        record.errors.append(message)
        self.problems.append(Problem(kind, record.name, message))

    # -------------------------------------------------------------- building registries
    def build_registries(self) -> Registries:
        """(Re)build every registry by calling each plugin's hooks, built-ins first.

        Hooks are called one implementation at a time so that each entry is attributed to the
        plugin that added it and a plugin raising inside a hook is reported on its own.
        """
        self.registries = Registries()
        self.problems = [p for p in self.problems if p.kind == "load-error"]
        loaded = [r for r in self.records if r.status == "loaded"]
        ordered = sorted(loaded, key=lambda r: (not r.builtin,))  # stable: keeps load order
        for hook_name in REGISTRY_HOOKS:
            registry = self.registries.by_hook[hook_name]
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            for record in ordered:
                for impl in (i for i in impls if i.plugin is record.plugin):
                    arguments = {"registry": registry}
                    try:
                        with registry.provided_by(record.provider):
                            impl.function(*[arguments[name] for name in impl.argnames])
                    except Exception as exc:
                        self._fail(record, "hook-error", exc)
        for conflict in self.registries.conflicts():
            self._problem("conflict", conflict.second.provider.plugin, conflict.message())
        self._check_unknown_hooks()
        return self.registries

    def _check_unknown_hooks(self) -> None:
        """Report hookimpls whose name matches no hookspec (usually a typo)."""
        known = set(REGISTRY_HOOKS)
        for hook_name, caller in vars(self.pm.hook).items():
            if hook_name.startswith("_") or caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                record = next((r for r in self.records if r.plugin is impl.plugin), None)
                owner = record.name if record else impl.plugin_name
                self._problem(
                    "unknown-hook",
                    owner,
                    f"implements `{hook_name}`, which is not an automodel hook."
                    f"{did_you_mean(hook_name, known)}",
                )

    def _problem(self, kind: str, plugin: str, message: str) -> None:
        if self.strict:
            raise PluginError(f"{plugin}: {message}")
        self.problems.append(Problem(kind, plugin, message))

    def warning_lines(self) -> list[str]:
        """One line per broken plugin, printed by the CLI on stderr."""
        return [
            f"automodel: warning: {problem} (see `automodel plugins doctor`)"
            for problem in self.problems
        ]


def _entry_point_order(ep: metadata.EntryPoint) -> tuple[bool, str, str]:
    dist = getattr(ep, "dist", None)
    dist_name = _normalize(dist.metadata["Name"]) if dist is not None else ""
    return (dist_name != BUILTIN_DISTRIBUTION, dist_name, ep.name)


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, loaded and populated on first use."""
    global _HOST
    if _HOST is None:
        host = PluginHost()
        host.load_entry_points()
        host.build_registries()
        _HOST = host
    return _HOST


def get_registries() -> Registries:
    return get_host().registries


def reset_host() -> None:
    """Forget the process-wide host (tests; after installing a plugin in-process)."""
    global _HOST
    _HOST = None
