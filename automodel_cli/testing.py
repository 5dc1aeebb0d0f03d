"""Pytest helpers for plugin authors, published as a ``pytest11`` entry point.

``automodel_plugin`` registers a plugin object (a module or any object with ``@hookimpl``
methods) with the process-wide plugin host for the duration of one test, rebuilds the registries
and removes it afterwards::

    def test_my_dataset(automodel_plugin):
        registries = automodel_plugin(my_plugin_module)
        assert "my_dataset" in registries.datasets
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from automodel_cli.plugin_host import get_host
from automodel_cli.registry import Registries


@pytest.fixture
def automodel_plugin() -> Iterator[Callable[..., Registries]]:
    host = get_host()
    added = []

    def register(plugin: Any, name: str | None = None) -> Registries:
        added.append(host.register(plugin, name=name))
        return host.build_registries()

    yield register
    for record in reversed(added):
        host.unregister(record)
    host.build_registries()
