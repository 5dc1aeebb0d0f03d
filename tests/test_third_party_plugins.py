"""A real pip install of third-party plugins, discovered through entry points.

The example plugin and a deliberately broken one are installed with pip into a throwaway
directory that only the subprocesses of these tests put on their path.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from plugin_packages import BROKEN, EXAMPLE, install_plugins


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    return install_plugins(tmp_path_factory.mktemp("site"), EXAMPLE, BROKEN)


def test_installed_plugin_entries_are_listed_with_provenance(plugin_env):
    datasets = json.loads(run_cli("list", "datasets", "--json", env=plugin_env).stdout)
    alpaca = next(d for d in datasets if d["name"] == "alpaca_jsonl")
    assert (alpaca["distribution"], alpaca["version"]) == ("automodel-plugin-example", "0.1.0")
    losses = json.loads(run_cli("list", "losses", "--json", env=plugin_env).stdout)
    assert "label_smoothed_ce" in {loss["name"] for loss in losses}
    models = json.loads(run_cli("list", "models", "--json", env=plugin_env).stdout)
    assert "tinyllama" in {m["name"] for m in models}


def test_installed_plugin_names_are_usable_in_configs(plugin_env):
    result = run_cli("config", "show", "tinyllama", "data.name=alpaca_jsonl",
                     "loss.name=label_smoothed_ce", env=plugin_env)
    assert result.exit_code == 0, result.stderr
    assert "path: TinyLlama/TinyLlama-1.1B-Chat-v1.0  # from preset tinyllama (automodel-plugin-example 0.1.0)" in result.stdout
    assert "name: alpaca_jsonl" in result.stdout
    # without the plugin the same names are rejected
    result = run_cli("config", "show", "llama3", "data.name=alpaca_jsonl")
    assert result.exit_code == 2 and "unknown dataset `alpaca_jsonl`" in result.stderr


def test_plugins_list_shows_loaded_and_broken(plugin_env):
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json", env=plugin_env).stdout)}
    example = plugins["example"]
    assert example["status"] == "loaded" and example["version"] == "0.1.0"
    assert example["hooks"] == ["register_datasets", "register_losses", "register_models"]
    broken = plugins["broken"]
    assert broken["status"] == "error"
    assert "automodel_dependency_that_is_not_installed" in broken["errors"][0]


def test_broken_plugin_warns_once_and_does_not_break_help(plugin_env):
    result = run_cli("--help", env=plugin_env)
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "broken" in warnings[0]
    assert "Traceback" not in result.stderr


def test_doctor_reports_the_broken_plugin(plugin_env):
    result = run_cli("plugins", "doctor", env=plugin_env)
    assert result.exit_code == 1
    assert "[load-error] broken" in result.stdout
    clean = run_cli("plugins", "doctor", env={**plugin_env, "AUTOMODEL_BLOCK_PLUGINS": "automodel-broken-plugin"})
    assert clean.exit_code == 0 and "No problems found." in clean.stdout
    assert "broken (automodel-broken-plugin): blocked by AUTOMODEL_BLOCK_PLUGINS" in clean.stdout


def test_strict_mode_makes_plugin_errors_fatal(plugin_env):
    result = run_cli("list", "models", env={**plugin_env, "AUTOMODEL_PLUGINS_STRICT": "1"})
    assert result.exit_code != 0
    assert "automodel_dependency_that_is_not_installed" in result.stderr


def test_disable_autoload_keeps_builtins_and_honours_allow_list(plugin_env):
    env = {**plugin_env, "AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--all", "--json", env=env).stdout)}
    assert plugins["example"]["status"] == "not-loaded"
    assert plugins["builtin-models"]["status"] == "loaded"
    env["AUTOMODEL_PLUGINS"] = "example"
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json", env=env).stdout)}
    assert plugins["example"]["status"] == "loaded"
    assert plugins["broken"]["status"] == "not-loaded"
