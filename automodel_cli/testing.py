"""Pytest helpers for plugin authors, published as a ``pytest11`` entry point.

``automodel_plugin`` gives each test a fresh plugin host holding the built-in plugins and only
the plugins the test registers (a module or any object with ``@hookimpl`` methods), makes it the
process-wide host for that test (so ``automodel_cli.cli.main([...])`` run in the test sees it)
and puts the previous host back afterwards. Other installed plugins take no part unless asked
(``load_installed=True``), so a plugin's tests do not depend on what else is installed::

    def test_my_dataset(automodel_plugin):
        registries = automodel_plugin(my_plugin_module)
        assert "my_dataset" in registries.datasets

Entries are attributed like installed ones: a plugin module that belongs to an installed
distribution is found automatically (``automodel list datasets`` says "from my-plugin 1.2"),
and ``name=``, ``distribution=`` and ``version=`` set it explicitly.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack
from importlib import metadata
from typing import Any

import pytest

from automodel_cli.plugin_host import PluginHost, installed_provenance, use_host
from automodel_cli.plugin_settings import ENV_STRICT, PluginSettings, env_flag, load_settings
from automodel_cli.registry import Registries


class PluginFixture:
    """What the ``automodel_plugin`` fixture returns: call it to register a plugin."""

    def __init__(self) -> None:
        self.host: PluginHost | None = None
        self._registered: list[tuple[Any, dict[str, Any]]] = []
        self._load_installed = False
        self._installed = ExitStack()

    def __call__(
        self,
        plugin: Any,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
        load_installed: bool = False,
    ) -> Registries:
        """Register ``plugin`` for this test and return the rebuilt registries.

        ``load_installed=True`` also loads the installed third-party plugins, as the command
        line would (honouring AUTOMODEL_BLOCK_PLUGINS and the other settings). Under
        AUTOMODEL_PLUGINS_STRICT=1 a plugin that fails to register raises here."""
        provenance = _provenance(plugin, name, distribution, version)
        self._registered.append((plugin, provenance))
        if self.host is None or (load_installed and not self._load_installed):
            self._load_installed |= load_installed
            self._start_host()
        else:
            self.host.register(plugin, **provenance)
        return self.host.build_registries()

    @property
    def registries(self) -> Registries:
        assert self.host is not None, "register a plugin first"
        return self.host.registries

    def _start_host(self) -> None:
        """A new host: built-ins (plus installed plugins if asked) and the test's plugins."""
        settings = load_settings() if self._load_installed else PluginSettings(strict=env_flag(ENV_STRICT))
        host = PluginHost(settings=settings)
        host.load_entry_points(third_party=self._load_installed)
        for plugin, provenance in self._registered:
            host.register(plugin, **provenance)
        self.close()
        self.host = host
        self._installed.enter_context(use_host(host))

    def close(self) -> None:
        self._installed.close()


def _provenance(plugin: Any, name: str | None, distribution: str | None,
                version: str | None) -> dict[str, Any]:
    """Name, distribution and version for ``plugin``: as given, else as installed."""
    entry_point = None
    if distribution is None and isinstance(plugin, types.ModuleType):
        entry_point, distribution, found_version = installed_provenance(plugin)
        version = version or found_version
    elif distribution is not None and version is None:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return {"name": name or entry_point, "distribution": distribution, "version": version}


@pytest.fixture
def automodel_plugin() -> Iterator[PluginFixture]:
    fixture = PluginFixture()
    try:
        yield fixture
    finally:
        fixture.close()
