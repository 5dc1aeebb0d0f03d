"""The plugin host: provenance, conflicts, overrides, broken plugins, env switches."""

from __future__ import annotations

import json
import types
from importlib import metadata

import pytest

from automodel_cli import hookimpl
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import PluginError, PluginHost, get_host
from automodel_cli.testing import PluginFixture


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
    assert record.errors == ["hook register_models takes (registry), got (registry, extra)"]


class MisnamedArguments:
    """A class-based plugin whose two hooks name their argument wrongly."""

    __name__ = "misnamed"

    @hookimpl
    def register_losses(self, reg):
        reg.add("never", "m:f")

    @hookimpl
    def register_datasets(self, registry):
        registry.add("fine", "m:f")

    @hookimpl
    def register_loggers(self, loggers):
        pass


def test_wrong_hook_argument_is_one_line_without_addresses():
    host = host_with(MisnamedArguments(), make_plugin("good", register_datasets=add_dataset("qa")))
    record = next(r for r in host.records if r.name == "misnamed")
    assert record.errors == ["hook register_loggers takes (registry), got (loggers); "
                             "hook register_losses takes (registry), got (reg)"]
    assert host.warning_lines() == [
        "automodel: warning: [load-error] misnamed: hook register_loggers takes (registry), "
        "got (loggers); hook register_losses takes (registry), got (reg) (see `automodel plugins doctor`)"]
    assert "fine" not in host.registries.datasets and "qa" in host.registries.datasets  # nothing half-registered


def builtins_with(*plugins) -> PluginHost:
    """A host with the real built-in plugins and ``plugins`` registered directly."""
    host = PluginHost(autoload=True, enabled=set(), blocked=set())
    host.load_entry_points(third_party=False)
    for plugin in plugins:
        host.register(plugin, name=plugin.__name__, distribution=f"dist-{plugin.__name__}", version="2.0")
    host.build_registries()
    return host


def reuse_builtin_loss(registry):
    registry.add("masked_ce", "somewhere:shadow_ce")
    registry.add("shadow_only", "somewhere:shadow_only")


def test_builtin_name_reused_by_a_plugin_keeps_the_builtin_and_warns():
    host = builtins_with(make_plugin("shadow", register_losses=reuse_builtin_loss))
    entry = host.registries.losses.get("masked_ce")  # no error: the built-in is in charge
    assert entry.provider.distribution == "automodel-cli" and entry.provider.builtin
    assert host.registries.losses.get("shadow_only").provider.plugin == "shadow"  # its other names work
    assert [(p.kind, p.plugin) for p in host.problems] == [("builtin-collision", "shadow")]
    [line] = host.warning_lines()
    for fragment in ("loss `masked_ce` is built in (automodel-cli", "`shadow` (dist-shadow 2.0)",
                     "override=True", "--block-plugin shadow", "AUTOMODEL_BLOCK_PLUGINS=shadow"):
        assert fragment in line


def test_builtin_name_taken_over_with_override():
    def take_over(registry):
        registry.add("masked_ce", "somewhere:better_ce", override=True)

    host = builtins_with(make_plugin("better", register_losses=take_over))
    entry = host.registries.losses.get("masked_ce")
    assert entry.provider.plugin == "better" and entry.replaces.provider.builtin
    assert host.problems == []


def test_strict_mode_makes_a_builtin_collision_fatal():
    host = PluginHost(strict=True, autoload=True, enabled=set(), blocked=set())
    host.load_entry_points(third_party=False)
    host.register(make_plugin("shadow", register_losses=reuse_builtin_loss))
    with pytest.raises(PluginError, match="loss `masked_ce` is built in"):
        host.build_registries()


def test_code_is_attributed_to_the_plugin_that_owns_its_module():
    host = builtins_with(make_plugin("shadow", register_losses=reuse_builtin_loss))
    assert host.plugin_owning(__name__).name == "shadow"  # the module of its hook functions
    assert host.plugin_owning("automodel_cli.components.loss.masked_ce") is None  # built-in code
    assert host.plugin_owning("torch.nn.functional") is None


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


# ------------------------------------------------------------------------ the fixture
def test_fixture_host_holds_builtins_and_the_test_plugin_only(automodel_plugin, cli):
    registries = automodel_plugin(make_plugin("fresh", register_datasets=add_dataset("fresh_qa")))
    host = automodel_plugin.host
    assert get_host() is host  # the CLI run in this test uses it
    assert [r.name for r in host.records if not r.builtin] == ["fresh"]
    assert "fresh_qa" in registries.datasets and "masked_ce" in registries.losses
    listed = cli("plugins", "list", "--json")
    assert [p["name"] for p in json.loads(listed.stdout)] == ["fresh"]


def test_fixture_provenance_is_shown_by_list(automodel_plugin, cli):
    automodel_plugin(make_plugin("fresh", register_datasets=add_dataset("fresh_qa")),
                     name="my_plugin", distribution="my-plugin", version="1.2")
    row = next(line for line in cli("list", "datasets").stdout.splitlines() if "fresh_qa" in line)
    assert "my-plugin 1.2" in row
    automodel_plugin(make_plugin("other", register_losses=reuse_builtin_loss), distribution="pluggy")
    assert automodel_plugin.registries.losses.get("shadow_only").provider.version == metadata.version("pluggy")


def test_fixture_puts_the_previous_host_back():
    previous = get_host()
    fixture = PluginFixture()
    fixture(make_plugin("fresh", register_datasets=add_dataset("fresh_qa")))
    assert get_host() is fixture.host is not previous
    fixture(make_plugin("more", register_datasets=add_dataset("more_qa")), load_installed=True)
    assert get_host() is fixture.host  # rebuilt with the installed plugins, both test plugins kept
    assert {"fresh_qa", "more_qa"} <= set(fixture.registries.datasets.names())
    fixture.close()
    assert get_host() is previous and "fresh_qa" not in previous.registries.datasets


def test_block_plugin_option_applies_to_one_command(automodel_plugin, cli):
    automodel_plugin(make_plugin("fresh", register_datasets=add_dataset("fresh_qa")))
    blocked = json.loads(cli("--block-plugin", "fresh", "plugins", "list", "--json").stdout)
    assert [(p["name"], p["status"], p["blocked_by"]) for p in blocked] == [("fresh", "blocked", "--block-plugin")]
    assert "fresh_qa" not in cli("--block-plugin=fresh", "list", "datasets", "--json").stdout
    assert get_host() is automodel_plugin.host  # the next command has it again
    assert "fresh_qa" in cli("list", "datasets", "--json").stdout
    late = cli("list", "datasets", "--block-plugin", "fresh")
    assert late.exit_code == 2 and "`--block-plugin` is a global option and goes before the command" in late.stderr


def test_fixture_raises_plugin_errors_in_strict_mode(automodel_plugin, monkeypatch):
    def register_losses(registry):
        raise RuntimeError("boom in hook")

    monkeypatch.setenv("AUTOMODEL_PLUGINS_STRICT", "1")
    with pytest.raises(RuntimeError, match="boom in hook"):
        automodel_plugin(make_plugin("bad", register_losses=register_losses))
