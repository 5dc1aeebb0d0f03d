"""Meta-tests: every hookspec is documented and tested; every config key is documented."""

from __future__ import annotations

import inspect
import re

from automodel_cli import hookspecs
from automodel_cli.config.compose import builtin_schema
from automodel_cli.plugin_host import get_registries
from conftest import REPO

HOOKS = [name for name, fn in vars(hookspecs).items()
         if callable(fn) and hasattr(fn, "automodel_spec")]


def hook_signature(name: str) -> str:
    function = getattr(hookspecs, name)
    parameters = ", ".join(
        f"{p.name}: {p.annotation}" for p in inspect.signature(function).parameters.values()
    )
    return f"def {name}({parameters}) -> None"


def test_there_are_hooks_for_every_registry_kind():
    assert len(HOOKS) >= 7


def test_every_hookspec_is_documented_with_its_exact_signature_and_an_example():
    docs = (REPO / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        assert f"### {name}" in docs, f"docs/plugins.md lacks a section for {name}"
        assert hook_signature(name) in docs, f"docs/plugins.md has the wrong signature for {name}"
        section = docs.split(f"### {name}", 1)[1].split("\n### ", 1)[0]
        assert "@hookimpl" in section, f"docs/plugins.md has no example for {name}"


def test_every_hookspec_is_exercised_by_a_test():
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py")
                        if p.name != "test_docs.py")
    for name in HOOKS:
        assert re.search(rf"\b{name}\b", sources), f"no test implements {name}"


def test_every_config_key_is_documented():
    """docs/config.md holds the tables generated from the same declarations the validator
    uses: the core, each built-in recipe's sections, each built-in entry's option table."""
    docs = (REPO / "docs" / "config.md").read_text()
    schema = builtin_schema(get_registries())
    missing = [key for key in schema.keys if f"`{key}`" not in docs]
    assert not missing, f"docs/config.md does not document {missing}"
    assert schema.markdown() in docs, "regenerate with: python -m automodel_cli.config.compose"
    for section in ("distill", "benchmark", "loss.linear_ce", "logging.wandb", "launch.slurm", "launch.k8s"):
        assert f"### `{section}`" in docs
