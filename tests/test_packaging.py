"""Every Python package in the source tree is installed (pyproject lists packages explicitly)."""

from __future__ import annotations

import tomllib

from conftest import REPO

ROOTS = {"automodel_cli": "automodel_cli", "recipes": "automodel_cli.recipes",
         "plugins": "automodel_cli.plugins"}


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for root, prefix in ROOTS.items():
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root).parts
            found.add(".".join((prefix, *relative)))
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["automodel_cli.recipes"] == "recipes"
    assert config["package-dir"]["automodel_cli.plugins"] == "plugins"
