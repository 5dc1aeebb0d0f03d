"""The plugin host: provenance, conflicts, overrides, broken plugins, env switches."""

from __future__ import annotations

import types

import pytest

from automodel_cli import hookimpl
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import PluginHost


def make_plugin(name: str, **hooks) -> types.SimpleNamespace:
    """A plugin object whose attributes are the given hook functions, marked as hookimpls."""
    return types.SimpleNamespace(__name__=name, **{k: hookimpl(v) for k, v in hooks.items()})


def host_with(*plugins, strict=False) -> PluginHost:
    host = PluginHost(strict=strict, autoload=True, enabled=set(), blocked=set())
    for plugin in plugins:
        host.register(plugin, name=plugin.__name__, distribution=f"dist-{plugin.__name__}", version="1.2")
    host.build_registries()
    return host


def add_dataset(name, override=False):
    def register_datasets(registry):
        registry.add(name, "somewhere:fn", description=name, override=override)
    return register_datasets


def test_entries_record_their_provider():
    host = host_with(make_plugin("alpha", register_datasets=add_dataset("qa")))
    entry = host.registries.datasets.get("qa")
    assert entry.provider.plugin == "alpha"
    assert str(entry.provider) == "dist-alpha 1.2"
    assert entry.as_dict()["distribution"] == "dist-alpha"


def test_duplicate_name_is_an_error_naming_both_plugins():
    host = host_with(make_plugin("alpha", register_datasets=add_dataset("qa")),
                     make_plugin("beta", register_datasets=add_dataset("qa")))
    with pytest.raises(UserError) as info:
        host.registries.datasets.get("qa")
    assert "dist-alpha 1.2" in str(info.value) and "dist-beta 1.2" in str(info.value)
    assert [p.kind for p in host.problems] == ["conflict"]
    assert host.problems[0].plugin == "beta"


def test_explicit_override_replaces_and_is_recorded():
    host = host_with(make_plugin("alpha", register_datasets=add_dataset("qa")),
                     make_plugin("beta", register_datasets=add_dataset("qa", override=True)))
    entry = host.registries.datasets.get("qa")
    assert entry.provider.plugin == "beta"
    assert entry.replaces.provider.plugin == "alpha"
    assert host.problems == []


def test_hook_that_raises_is_reported_and_others_still_register():
    def register_losses(registry):
        raise RuntimeError("boom in hook")

    host = host_with(make_plugin("bad", register_losses=register_losses,
                                 register_datasets=add_dataset("from_bad")),
                     make_plugin("good", register_datasets=add_dataset("qa")))
    assert "qa" in host.registries.datasets
    assert "from_bad" in host.registries.datasets  # its other hook still ran
    record = next(r for r in host.records if r.name == "bad")
    assert record.status == "error" and "boom in hook" in record.errors[0]
    lines = host.warning_lines()
    assert len(lines) == 1 and "bad" in lines[0] and "plugins doctor" in lines[0]


def test_strict_mode_reraises_hook_errors():
    def register_losses(registry):
        raise RuntimeError("boom in hook")

    with pytest.raises(RuntimeError, match="boom in hook"):
        host_with(make_plugin("bad", register_losses=register_losses), strict=True)


def test_unknown_hook_is_reported_with_suggestion():
    host = host_with(make_plugin("typo", register_datsets=add_dataset("qa")))
    problem = next(p for p in host.problems if p.kind == "unknown-hook")
    assert problem.plugin == "typo"
    assert "register_datsets" in problem.message and "`register_datasets`" in problem.message


def test_hookimpl_with_wrong_arguments_is_a_load_error():
    def register_models(registry, extra):
        pass

    host = host_with(make_plugin("wrongargs", register_models=register_models))
    record = next(r for r in host.records if r.name == "wrongargs")
    assert record.status == "error"


def test_every_registry_hook_feeds_its_registry():
    hooks = {
        "register_recipes": lambda registry: registry.add("r", "m:f", defaults={"train": {"seed": 1}}),
        "register_models": lambda registry: registry.add("m", path="org/model", family="llama"),
        "register_datasets": lambda registry: registry.add("d", "m:f"),
        "register_losses": lambda registry: registry.add("l", "m:f"),
        "register_parallel_plans": lambda registry: registry.add("my_arch", "m:plan"),
        "register_launchers": lambda registry: registry.add("la", "m:f"),
        "register_loggers": lambda registry: registry.add("lo", "m:f", requires=["somepkg"]),
    }
    host = host_with(make_plugin("all", **hooks))
    regs = host.registries
    assert regs.recipes.get("r").metadata["defaults"] == {"train": {"seed": 1}}
    assert regs.models.get("m").metadata["path"] == "org/model"
    assert "d" in regs.datasets and "l" in regs.losses and "la" in regs.launchers
    assert regs.parallel_plans.get("my_arch").target == "m:plan"
    assert regs.loggers.get("lo").metadata["requires"] == ["somepkg"]
    record = next(r for r in host.records if r.name == "all")
    assert record.hooks == sorted(hooks)


def test_unknown_name_suggests_closest():
    host = host_with(make_plugin("alpha", register_datasets=add_dataset("squad")))
    with pytest.raises(UserError, match="Did you mean `squad`"):
        host.registries.datasets.get("sqaud")


def test_lazy_target_errors_name_the_plugin():
    host = host_with(make_plugin("alpha", register_datasets=add_dataset("qa")))
    with pytest.raises(UserError, match="dataset `qa` from dist-alpha 1.2 points to `somewhere:fn`"):
        host.registries.datasets.get("qa").load()


def test_fixture_registers_for_one_test(automodel_plugin, cli):
    registries = automodel_plugin(make_plugin("fixture_plugin", register_datasets=add_dataset("only_here")))
    assert "only_here" in registries.datasets
    result = cli("list", "datasets", "--json")
    assert '"only_here"' in result.stdout


def test_fixture_cleans_up(cli):
    result = cli("list", "datasets", "--json")
    assert "only_here" not in result.stdout
