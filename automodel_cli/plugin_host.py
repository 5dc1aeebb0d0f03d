"""The plugin host: loads entry points one at a time and fills the registries.

Lessons from pytest and simonw/llm: built-ins load through the same entry-point path as
third-party plugins; a plugin that fails to import or register is recorded and reported, never
allowed to break ``--help`` or unrelated commands; a third-party plugin that registers a
built-in name without ``override=True`` is ignored for that name (with a warning), never allowed
to break the built-in; strict mode, autoload off and a block list come from the command line,
environment variables or the settings file (plugin_settings.py).

Environment variables
    AUTOMODEL_PLUGINS_STRICT=1          re-raise plugin errors instead of reporting them
    AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD=1 load only built-ins (plus those in AUTOMODEL_PLUGINS)
    AUTOMODEL_PLUGINS=a,b               third-party plugins to load even with autoload off
    AUTOMODEL_BLOCK_PLUGINS=a,b         never load these (entry-point or distribution names)
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from automodel_cli import PROJECT_NAME, hookspecs
from automodel_cli.errors import did_you_mean
from automodel_cli.plugin_settings import Layer, PluginSettings, exported_environment, load_settings
from automodel_cli.plugin_settings import normalize as _normalize
from automodel_cli.registry import REGISTRY_HOOKS, Provider, Registries

ENTRY_POINT_GROUP = PROJECT_NAME
BUILTIN_DISTRIBUTION = "automodel-cli"
#: Code under this package is ours, never a plugin's, whoever registered it.
BUILTIN_PACKAGE = "automodel_cli"


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
    #: The option, variable or settings file that blocked it (status "blocked").
    blocked_by: str | None = None
    #: Registered with ``PluginHost.register`` (tests, embedding), not found as an entry point.
    direct: bool = False

    @property
    def provider(self) -> Provider:
        return Provider(self.name, self.distribution, self.version, builtin=self.builtin)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "status": self.status,
            "blocked_by": self.blocked_by,
            "hooks": self.hooks,
            "errors": self.errors,
        }


@dataclass
class Problem:
    """One thing ``plugins doctor`` reports."""

    kind: str  # load-error | hook-error | conflict | builtin-collision | unknown-hook
    plugin: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.plugin}: {self.message}"


def _describe_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _one_line(exc: BaseException) -> str:
    """An exception on one line, without the memory addresses and ids of pluggy's messages."""
    text = " ".join(str(exc).split())
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = re.sub(r"([\w.-]+):\d{6,}", r"\1", text)  # our pluggy names are "NAME:id(plugin)"
    return f"{type(exc).__name__}: {text}"


def _argument_names(function: Any) -> list[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _is_builtin_distribution(distribution: str | None) -> bool:
    return distribution is not None and _normalize(distribution) == BUILTIN_DISTRIBUTION


class PluginHost:
    """Owns the pluggy manager, the plugin records and the registries built from them."""

    def __init__(
        self,
        *,
        settings: PluginSettings | None = None,
        strict: bool | None = None,
        autoload: bool | None = None,
        enabled: set[str] | None = None,
        blocked: set[str] | None = None,
    ) -> None:
        if settings is None and autoload is None and enabled is None and blocked is None:
            settings = load_settings()  # the command line's layer comes through host_for_command
        elif settings is None:  # explicit arguments replace the environment and the settings file
            settings = PluginSettings((Layer("PluginHost arguments", autoload, tuple(enabled or ()),
                                             tuple(blocked or ())),))
        self.settings = settings
        self.strict = settings.strict if strict is None else strict
        #: Whether third-party entry points were looked at (the test fixture loads built-ins only).
        self.third_party = True
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.registries = Registries()
        self.problems: list[Problem] = []

    # ----------------------------------------------------------------- loading plugins
    def load_entry_points(self, *, third_party: bool = True) -> None:
        """Load every ``automodel`` entry point (only the built-ins without ``third_party``),
        one at a time, recording failures."""
        self.third_party = third_party
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_entry_point_order):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            builtin = _is_builtin_distribution(dist_name)
            if not builtin and not third_party:
                continue
            record = PluginRecord(
                name=ep.name,
                distribution=dist_name,
                version=dist.version if dist is not None else None,
                module=ep.value,
                builtin=builtin,
            )
            self.records.append(record)
            if self._blocked(record):
                continue
            if not record.builtin and not self.settings.autoload and not self._is_enabled(record):
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
        """Register a plugin object directly (tests, embedding applications).

        A plugin object that is already loaded (its module is also an installed entry point)
        keeps its record; a blocked name is recorded as blocked and not registered."""
        loaded = next((r for r in self.records if r.plugin is plugin and r.status == "loaded"), None)
        if loaded is not None:
            return loaded
        record = PluginRecord(
            name=name or getattr(plugin, "__name__", None) or type(plugin).__name__,
            distribution=distribution,
            version=version,
            module=getattr(plugin, "__name__", None),
            builtin=_is_builtin_distribution(distribution),
            plugin=plugin,
            direct=True,
        )
        self.records.append(record)
        if not self._blocked(record):
            self._register(record, plugin)
        return record

    def unregister(self, record: PluginRecord) -> None:
        if record.plugin is not None and self.pm.is_registered(record.plugin):
            self.pm.unregister(record.plugin)
        self.records.remove(record)

    def with_layer(self, layer: Layer) -> PluginHost:
        """A new host like this one with ``layer`` (the command line's options) on top: the same
        entry points, the same directly registered plugins, the new blocks applied."""
        host = PluginHost(settings=self.settings.on_top(layer), strict=self.strict)
        host.load_entry_points(third_party=self.third_party)
        for record in self.records:
            if record.direct:
                host.register(record.plugin, record.name, distribution=record.distribution,
                              version=record.version)
        host.build_registries()
        return host

    def _register(self, record: PluginRecord, plugin: Any) -> None:
        record.plugin = plugin
        try:
            self.pm.register(plugin, name=f"{record.name}:{id(plugin)}")
        except pluggy.PluginValidationError as exc:  # a hookimpl whose arguments match no spec
            self._fail(record, "load-error", exc, self._signature_mismatches(plugin) or _one_line(exc))
            return
        except Exception as exc:
            self._fail(record, "load-error", exc)
            return
        record.status = "loaded"
        record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def _signature_mismatches(self, plugin: Any) -> str:
        """``hook register_losses takes (registry), got (reg)`` for each hookimpl of ``plugin``
        that names an argument its hookspec does not have."""
        mismatches = []
        for attribute in dir(plugin):
            options = self.pm.parse_hookimpl_opts(plugin, attribute)
            if options is None:
                continue
            hook_name = options.get("specname") or attribute
            caller = getattr(self.pm.hook, hook_name, None)
            spec = caller.spec if caller is not None else None
            if spec is None:
                continue
            got = _argument_names(getattr(plugin, attribute))
            if set(got) - {*spec.argnames, *spec.kwargnames}:
                mismatches.append(f"hook {hook_name} takes ({', '.join(spec.argnames)}), "
                                  f"got ({', '.join(got)})")
        return "; ".join(mismatches)

    def _blocked(self, record: PluginRecord) -> bool:
        names = {_normalize(record.name)}
        if record.distribution:
            names.add(_normalize(record.distribution))
        record.blocked_by = self.settings.blocked_by(names)
        if record.blocked_by is not None:
            record.status = "blocked"
        return record.blocked_by is not None

    def _is_enabled(self, record: PluginRecord) -> bool:
        names = {_normalize(record.name)}
        if record.distribution:
            names.add(_normalize(record.distribution))
        return bool(names & self.settings.enabled)

    def _fail(self, record: PluginRecord, kind: str, exc: BaseException, message: str | None = None) -> None:
        if self.strict:
            raise exc
        record.status = "error"
        message = message or _describe_exception(exc)
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
            kind = "builtin-collision" if conflict.keeps_builtin else "conflict"
            self._problem(kind, conflict.second.provider.plugin, conflict.message())
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

    # ------------------------------------------------------------ whose code is this?
    def plugin_owning(self, module_name: str) -> PluginRecord | None:
        """The third-party plugin whose code lives in ``module_name``, or None (ours, a library's).

        A plugin owns the modules of its hook functions and of its entry point, and, when it
        comes from a distribution, that distribution's top-level packages. The most specific
        match wins, a plugin's own module before a package it shares with its distribution."""
        best: tuple[int, bool] = (-1, False)
        owner = None
        for prefix, own, record in self._code_prefixes():
            if module_name == prefix or module_name.startswith(prefix + "."):
                if (len(prefix), own) > best:
                    best, owner = (len(prefix), own), record
        return owner

    def _code_prefixes(self) -> Iterator[tuple[str, bool, PluginRecord]]:
        for record in self.records:
            if record.builtin or record.plugin is None or not self.pm.is_registered(record.plugin):
                continue
            own = self._own_modules(record)
            shared = {module.split(".")[0] for module in own}
            if record.distribution:
                shared |= _top_level_packages(record.distribution)
            for prefix in own | shared:
                if prefix.split(".")[0] != BUILTIN_PACKAGE:
                    yield prefix, prefix in own, record

    def _own_modules(self, record: PluginRecord) -> set[str]:
        plugin = record.plugin
        modules = {record.module.partition(":")[0]} if record.module and not record.direct else set()
        if isinstance(plugin, types.ModuleType):
            modules.add(plugin.__name__)
        for caller in self.pm.get_hookcallers(plugin) or []:
            modules.update(impl.function.__module__ for impl in caller.get_hookimpls()
                           if impl.plugin is plugin and getattr(impl.function, "__module__", None))
        return modules


def _entry_point_order(ep: metadata.EntryPoint) -> tuple[bool, str, str]:
    dist = getattr(ep, "dist", None)
    dist_name = _normalize(dist.metadata["Name"]) if dist is not None else ""
    return (dist_name != BUILTIN_DISTRIBUTION, dist_name, ep.name)


@lru_cache(maxsize=1)
def _packages_by_distribution() -> dict[str, frozenset[str]]:
    """Normalized distribution name -> its top-level import names (read once: it scans every
    installed distribution, so only error reports and the test fixture ask)."""
    packages: dict[str, set[str]] = {}
    for package, distributions in metadata.packages_distributions().items():
        for distribution in distributions:
            packages.setdefault(_normalize(distribution), set()).add(package)
    return {name: frozenset(found) for name, found in packages.items()}


def _top_level_packages(distribution: str) -> frozenset[str]:
    return _packages_by_distribution().get(_normalize(distribution), frozenset())


def installed_provenance(module: types.ModuleType) -> tuple[str | None, str | None, str | None]:
    """(entry-point name, distribution, version) of an installed plugin module, as far as known.

    The entry point whose value is the module gives all three; otherwise the distribution that
    installed the module's file gives the last two."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        if ep.value == module.__name__ and dist is not None:
            return ep.name, dist.metadata["Name"], dist.version
    top_level = module.__name__.split(".")[0]
    for name, packages in _packages_by_distribution().items():
        if top_level in packages:
            distribution = metadata.distribution(name)
            if _installed_file(distribution, getattr(module, "__file__", None)):
                return None, distribution.metadata["Name"], distribution.version
    return None, None, None


def _installed_file(distribution: metadata.Distribution, path: str | None) -> bool:
    """Whether ``path`` is one of the files ``distribution`` installed (a ``tests`` package that
    some distribution also ships is not that distribution's)."""
    if not path:
        return False
    target = Path(path).resolve()
    return any(Path(str(distribution.locate_file(file))).resolve() == target
               for file in distribution.files or [])


_HOST: PluginHost | None = None

#: Set for the processes a command starts, once it has shown the plugin warnings.
WARNINGS_SHOWN_ENV = "AUTOMODEL_PLUGIN_WARNINGS_SHOWN"


def _loaded(host: PluginHost) -> PluginHost:
    host.load_entry_points()
    host.build_registries()
    return host


def get_host() -> PluginHost:
    """The process-wide host, loaded and populated on first use."""
    global _HOST
    if _HOST is None:
        _HOST = _loaded(PluginHost())
    return _HOST


def get_registries() -> Registries:
    return get_host().registries


def reset_host() -> None:
    """Forget the process-wide host (tests; after installing a plugin in-process)."""
    global _HOST
    _HOST = None


@contextmanager
def use_host(host: PluginHost | None) -> Iterator[PluginHost | None]:
    """Make ``host`` the process-wide host for a block (the test fixture, one command's
    options), then put back the one before."""
    global _HOST
    previous, _HOST = _HOST, host
    try:
        yield host
    finally:
        _HOST = previous


@contextmanager
def host_for_command(command_line: Layer | None) -> Iterator[PluginHost]:
    """The host one CLI invocation runs with: the process-wide one, or, when the command line
    blocks plugins or turns autoload off, one built with those options on top, which is also
    exported to the processes the command starts (torchrun ranks)."""
    if not command_line:
        yield get_host()
        return
    if _HOST is not None:
        host = _HOST.with_layer(command_line)
    else:  # never load, even once, what the command line blocks
        host = _loaded(PluginHost(settings=load_settings(command_line)))
    with use_host(host), exported_environment(command_line.exported()):
        yield host


@contextmanager
def warnings_shown_once(host: PluginHost, echo: Any) -> Iterator[None]:
    """Show the host's warning lines unless the automodel process that started this one already
    did (torchrun ranks run ``automodel`` again), and tell the processes started here."""
    if not os.environ.get(WARNINGS_SHOWN_ENV):
        for line in host.warning_lines():
            echo(line)
    with exported_environment({WARNINGS_SHOWN_ENV: "1"}):
        yield
